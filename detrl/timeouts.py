"""How long each part of a run may take before it is stopped and named (`timeouts.*` in the config):
long enough for a healthy phase at the run's shape, short enough that a hang ends a nightly."""

from __future__ import annotations

from .config import RunConfig


def startup(cfg: RunConfig) -> float:
    """Starting the workers: Ray, the engine (CUDA graphs, JIT compiles on a cold host), the trainer."""
    return cfg.timeouts.startup_s or (900.0 if cfg.on_gpu else 300.0)


def phase(cfg: RunConfig) -> float:
    """One phase of one iteration (weight sync, rollout, train, hashing, a checkpoint)."""
    if cfg.timeouts.phase_s:
        return cfg.timeouts.phase_s
    r = cfg.rollout
    tokens = r.prompts_per_step * r.samples_per_prompt * r.max_new_tokens
    return 300.0 + tokens * (0.002 if cfg.on_gpu else 0.05)


def run(cfg: RunConfig) -> float:
    """A bound on one whole run: start-up plus every phase of every iteration at its limit."""
    return startup(cfg) + cfg.train.steps * 5 * phase(cfg)
