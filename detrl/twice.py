"""How runs A and B are scheduled: one after the other, or side by side, each on its own GPUs.
Each run has its own workers either way; only the wall time changes (the ledgers are compared
with a sequential pair in the tests and on the GPU, benchmarks/results/)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch

from .config import ConfigError, RunConfig

T = TypeVar("T")


def local_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose(cfg: RunConfig, gpus: int | None = None) -> tuple[str, str]:
    """(mode, why). Raises ConfigError when side_by_side is asked for and this machine cannot hold it."""
    mode, need = cfg.resources.twice, 2 * cfg.gpus_per_run
    if cfg.resources.ray_address:
        if mode == "auto":
            return "sequential", (
                f"auto does not size a Ray cluster; set resources.twice=side_by_side when it has {need} GPUs free"
            )
        return mode, "as configured (Ray cluster)"
    if not cfg.on_gpu:
        if mode != "auto":
            return mode, "as configured"
        # a run keeps one phase busy at a time (rollout, then train) on cpu_threads per rank, so two runs
        # overlap well: measured 1.35x (tiny-cpu) and 1.19x (smollm2-cpu) faster on 2 cores (README)
        cores, busy = os.cpu_count() or 1, cfg.resources.trainer_ranks * cfg.resources.cpu_threads
        if cores >= 2 * busy:
            return "side_by_side", f"{cores} CPU cores hold both runs ({busy} busy thread(s) each)"
        return "sequential", f"{cores} CPU core(s): one run at a time"
    have = local_gpus() if gpus is None else gpus
    if mode == "side_by_side" and have < need:
        raise ConfigError(
            f"resources.twice=side_by_side needs {need} GPUs ({cfg.gpus_per_run} per run) but this "
            f"machine has {have}; use resources.twice=sequential (or auto)"
        )
    if mode == "auto":
        if have >= need:
            return "side_by_side", f"{have} GPUs hold both runs ({cfg.gpus_per_run} each)"
        return "sequential", f"{have} GPU(s): one run at a time ({cfg.gpus_per_run} each)"
    return mode, "as configured"


def run_both(
    run_a: Callable[[], T], run_b: Callable[[], T], mode: str, hold: AbstractContextManager[Any] | None = None
) -> tuple[T, T]:
    """Run both; side by side, both finish (or fail) before an error of either is raised. `hold` is
    entered around side-by-side runs (workers.shared_ray: their Ray, started in this thread)."""
    if mode != "side_by_side":
        return run_a(), run_b()
    with hold or nullcontext(), ThreadPoolExecutor(2, thread_name_prefix="detrl-run") as pool:
        fa, fb = pool.submit(run_a), pool.submit(run_b)
        errors = [f.exception() for f in (fa, fb)]
    for err in errors:
        if err is not None:
            raise err
    return fa.result(), fb.result()
