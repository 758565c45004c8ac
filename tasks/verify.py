"""Compare the two ledgers and publish the verdict as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from detrl.ledger import PHASES, read_ledger
from detrl.verify import SHAPE_KEYS, Verdict, format_markdown, format_text, verify

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    return "".join(SPARK[int((v - lo) / (hi - lo) * (len(SPARK) - 1)) if hi > lo else 0] for v in values)


@task(name="verify", cache_policy=NO_CACHE)
def verify_runs(run_a: str, run_b: str) -> Verdict:
    log = get_run_logger()
    verdict = verify(run_a, run_b)
    log.info(format_text(verdict))
    # plain paths: a file:// link to the worker's disk is dead in the browser that shows the artifact
    paths = {f"ledger {k}": str(Path(d, "ledger.jsonl").resolve()) for k, d in (("A", run_a), ("B", run_b))}
    stats = {k: [it["stats"] for it in read_ledger(d).iterations] for k, d in (("A", run_a), ("B", run_b))}
    curves = "\n".join(f"- run {k}: reward `{sparkline([s['mean_reward'] for s in v])}` "
                       f"loss `{sparkline([s['loss'] for s in v])}`" for k, v in stats.items())
    create_markdown_artifact(format_markdown(verdict, paths) + "\n## Reward and loss per iteration\n\n" + curves,
                             key="detrl-verdict", description=f"reproducibility verdict: {verdict.status}")
    create_table_artifact([{"iteration": r["iteration"], **{p: r[p] for p in PHASES}} for r in verdict.table],
                          key="detrl-phases", description="iteration x phase: match or DIFF")
    metrics = ("loss", "grad_norm", *SHAPE_KEYS, "step_s")
    rows = [{"run": k, "iteration": i, **{m: round(s[m], 6) for m in metrics if m in s}}
            for k, v in stats.items() for i, s in enumerate(v)]
    create_table_artifact(rows, key="detrl-curves", description="reward, loss, response lengths, EOS fraction, logprob diff and step time per iteration")
    return verdict
