"""Compare the two ledgers and publish the verdict as Prefect artifacts: the verdict (markdown, with
the plot embedded), the iteration x phase table, the per-iteration curves (table and image)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from detrl.ledger import PHASES, read_ledger
from detrl.plot import curves_png, data_uri
from detrl.verify import SHAPE_KEYS, Verdict, format_markdown, format_text, verify


@task(name="verify", cache_policy=NO_CACHE)
def verify_runs(run_a: str, run_b: str) -> Verdict:
    log = get_run_logger()
    # the ledger paths are shown as plain text: a file:// link to the worker's disk is dead in a browser
    verdict = verify(str(Path(run_a).resolve()), str(Path(run_b).resolve()))
    log.info(format_text(verdict))
    stats = {k: [it["stats"] for it in read_ledger(d).iterations] for k, d in (("A", run_a), ("B", run_b))}
    # Prefect 3.8's UI renders both an image artifact and a markdown image from a data: URI
    # (checked in headless Chromium, benchmarks/ui_screenshots.py); the PNG is about 40 kB.
    plot = data_uri(curves_png(stats, f"run A vs run B: {verdict.status}"))
    create_markdown_artifact(format_markdown(verdict) + f"\n## Per iteration\n\n![reward, loss, length, logprob diff]({plot})\n",
                             key="detrl-verdict", description=f"reproducibility verdict: {verdict.status}")
    create_image_artifact(image_url=plot, key="detrl-plot",
                          description="reward, loss, response length, trainer-vs-rollout logprob diff: run A, run B dashed")
    create_table_artifact([{"iteration": r["iteration"], **{p: r[p] for p in PHASES}} for r in verdict.table],
                          key="detrl-phases", description="iteration x phase: match or DIFF")
    metrics = ("loss", "grad_norm", *SHAPE_KEYS, "step_s")
    rows = [{"run": k, "iteration": i, **{m: round(s[m], 6) for m in metrics if m in s}}
            for k, v in stats.items() for i, s in enumerate(v)]
    create_table_artifact(rows, key="detrl-curves", description="reward, loss, response lengths, EOS fraction, logprob diff and step time per iteration")
    return verdict
