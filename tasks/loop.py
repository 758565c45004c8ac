"""One run of the GRPO loop. Never cached: both runs of a verification must really run."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from detrl import schedule
from detrl.artifacts import Converting
from detrl.config import ConfigError, RunConfig
from detrl.convert import ConvertedArtifact
from detrl.data import DatasetArtifact
from detrl.determinism import DeterminismError
from detrl.loop import Artifacts, compile_cache_dir, run
from detrl.models import ModelArtifact
from detrl.plant import Perturbation
from detrl.ray.errors import PhaseTimeout, RunError
from detrl.records import progress_line


def _worker_crash(task: Any, task_run: Any, state: Any) -> bool:
    """Retry (and so resume from the last checkpoint) when a worker died, not on bad input nor on a
    phase that hung (a second hang would only hold the nightly slot longer)."""
    try:
        state.result()
    except (ConfigError, DeterminismError, RunError, PhaseTimeout):
        return False
    except Exception:
        return True
    return False


@task(
    name="run-loop",
    cache_policy=NO_CACHE,
    task_run_name="run-loop-{label}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_worker_crash,
)
def run_loop(
    cfg: RunConfig,
    run_dir: str,
    model: ModelArtifact,
    data: DatasetArtifact,
    megatron: ConvertedArtifact | Converting,
    label: str,
    plant: list[str],
    cache_dir: str | None = None,
) -> str:
    log = get_run_logger()
    steps = cfg.train.steps
    progress: UUID = create_progress_artifact(  # type: ignore[assignment] # sync in a sync task
        progress=0.0, key=f"detrl-progress-{label.lower()}", description=f"run {label}: iterations done, of {steps}"
    )

    def report(it: int, n: int, stats: dict[str, Any]) -> None:
        log.info(f"run {label}: iteration {it + 1}/{n}: {progress_line(stats)}")
        update_progress_artifact(progress, progress=100.0 * (it + 1) / n)

    # resume=True: a retry after a worker crash continues from the run's last checkpoint (or its start)
    summary = run(
        cfg,
        run_dir,
        Artifacts(model, data, megatron, compile_cache=compile_cache_dir(cache_dir) if cache_dir else None),
        resume=True,
        perturbations=[Perturbation.parse(p) for p in plant],
        progress=report,
        schedule=schedule.for_run(cfg, label),
    )
    log.info(f"run {label}: {summary.iterations} iterations in {summary.wall_s:.1f}s -> {run_dir}/ledger.jsonl")
    return run_dir
