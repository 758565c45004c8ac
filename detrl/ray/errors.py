"""The errors a run's workers raise. No Ray here: the CLI and the Prefect tasks catch them cheaply."""

from __future__ import annotations


class RunError(RuntimeError):
    pass


class WeightSyncError(RunError):
    """The engine does not hold exactly the weights the trainer sent."""


class WorkerStartError(RunError):
    """A worker (most often the rollout engine) died while starting; the message is its own."""


class PhaseTimeout(RuntimeError):
    """A phase did not finish in time (a hung engine, NCCL collective or worker); the run is stopped."""


class WorkerDied(RuntimeError):
    """A worker's process is gone before Ray reports it (processes it forked keep its connection to Ray
    open until they exit). Not a RunError: like Ray's own actor death, a retry resumes the run."""
