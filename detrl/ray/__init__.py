"""The Ray side of a run, one job per module (after slime's `slime/ray/`):

- `session`: the process's Ray (start or join, reference count, reaper) and the one reach into Ray's
  private node object;
- `env`: what every worker process sees (`runtime_env`) and the one determinism-env and FA3 check that
  the workers and `doctor` both call;
- `trainer_actor`, `rollout_actor`: the actors, each importing only what it needs, on first use;
- `faults`: the test-only fault-injection hooks, applied at actor creation;
- `group`: `Workers`, the actors of one run and what the loop asks of them;
- `errors`: the run errors, importable without Ray.

Weight sync between the actors is a strategy of its own: `detrl.weight_sync`."""
