"""Preflight checks before any download, and the golden-ledger comparison after the verdict."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from detrl import doctor, golden
from detrl.config import RunConfig
from detrl.determinism import DeterminismError


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(cfg: RunConfig) -> None:
    report = doctor.run(cfg, in_workers=False)  # each run reads its workers' environment back as well
    get_run_logger().info("preflight checks:\n" + report.table())
    create_table_artifact(
        report.rows(),
        key="detrl-preflight",
        description="preflight checks of the driver and of the environment the workers get",
    )
    if not report.ok:
        raise DeterminismError(
            "preflight failed:\n" + "\n".join(f"{c.where}: {c.name}: {c.detail} -> {c.fix}" for c in report.failures())
        )


@task(name="golden-check", cache_policy=NO_CACHE)
def golden_check(run_dir: str, store: str, update: bool) -> golden.GoldenResult:
    res = golden.check(run_dir, store, update=update)
    get_run_logger().info(res.text())
    return res
