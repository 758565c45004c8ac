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
