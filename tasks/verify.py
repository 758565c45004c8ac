"""Compare the two ledgers and publish the verdict as Prefect artifacts: the verdict (markdown, with
the plot embedded), the plot, the iteration x phase table and the per-iteration curves."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from detrl.report import flow_artifacts, format_text
from detrl.verify import Verdict, verify


@task(name="verify", cache_policy=NO_CACHE)
def verify_runs(run_a: str, run_b: str) -> Verdict:
    verdict = verify(str(Path(run_a).resolve()), str(Path(run_b).resolve()))
    get_run_logger().info(format_text(verdict))
    arts = flow_artifacts(verdict)
    create_markdown_artifact(
        arts.markdown, key="detrl-verdict", description=f"reproducibility verdict: {verdict.status}"
    )
    create_image_artifact(
        image_url=arts.plot,
        key="detrl-plot",
        description="reward, loss, response length, trainer-vs-rollout logprob diff: run A, run B dashed",
    )
    create_table_artifact(arts.phases, key="detrl-phases", description="iteration x phase: match or DIFF")
    create_table_artifact(
        arts.curves,
        key="detrl-curves",
        description="reward, loss, response lengths, EOS fraction, logprob diff and step time per iteration",
    )
    return verdict
