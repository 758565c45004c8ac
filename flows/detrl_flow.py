"""The det-rl flow: download model -> download dataset -> convert HF -> Megatron -> run loop A ->
run loop B -> verify. Ends Failed when the two runs differ, so a nightly schedule alerts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Failed

from detrl.config import PROFILES
from detrl.rundir import check_out_dir
from detrl.util import default_dir
from tasks.diagnose import golden_check, preflight
from tasks.loop import run_loop
from tasks.prepare import convert_checkpoint, download_dataset, download_model, resolve_config
from tasks.verify import verify_runs

Profile = Literal[("auto", *PROFILES)]  # type: ignore[valid-type]


@flow(name="det-rl", log_prints=True)
def detrl_flow(
    profile: Profile = "auto",
    seed: int | None = None,
    steps: int | None = None,
    prompts_per_step: int | None = None,
    samples_per_prompt: int | None = None,
    max_new_tokens: int | None = None,
    determinism: bool = True,
    overrides: list[str] = [],  # noqa: B006 - Prefect shows parameters, never mutates them
    plant: list[str] = [],  # noqa: B006 - ITER:TENSOR bit flips in run B, to prove the check catches them
    cache_dir: str | None = None,
    runs_dir: str | None = None,
    golden_store: str | None = None,
    update_golden: bool = False,
) -> dict[str, Any]:
    typed = {"train.steps": steps, "rollout.prompts_per_step": prompts_per_step,
             "rollout.samples_per_prompt": samples_per_prompt, "rollout.max_new_tokens": max_new_tokens,
             "determinism.enabled": determinism}
    cfg = resolve_config(profile, seed, {k: v for k, v in typed.items() if v is not None}, overrides)
    out = Path(runs_dir or default_dir("runs"))
    out = check_out_dir(out / f"{time.strftime('%Y%m%d-%H%M%S')}-{flow_run.get_name() or 'local'}")
    preflight(cfg)
    cache = cache_dir or default_dir("cache")

    model = download_model(cfg, cache)
    data = download_dataset(cfg, cache)
    megatron = convert_checkpoint(model, cache)
    run_a = run_loop(cfg, str(out / "run_a"), model, data, megatron, "A", [])
    run_b = run_loop(cfg, str(out / "run_b"), model, data, megatron, "B", plant)
    verdict = verify_runs(run_a, run_b)

    result = {"status": verdict.status, "runs": str(out), "profile": cfg.profile}
    if verdict.status != "identical":
        where = f" at {verdict.first.where()}" if verdict.first else ""
        return Failed(message=f"runs {verdict.status}{where}: {verdict.likely_cause or verdict.problems}",
                      data=result)
    gold = golden_check(run_a, golden_store or default_dir("golden"), update_golden)
    result["golden"] = gold.status
    if not gold.ok:
        return Failed(message=gold.text(), data=result)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run the det-rl flow once (ephemeral Prefect unless PREFECT_API_URL is set)")
    ap.add_argument("--profile", default="auto", choices=["auto", *PROFILES])
    ap.add_argument("--seed", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--plant", action="append", default=[], metavar="ITER:TENSOR")
    a = ap.parse_args(argv)
    state = detrl_flow(profile=a.profile, seed=a.seed, steps=a.steps, overrides=a.overrides, plant=a.plant,
                       return_state=True)
    result = state.result(raise_on_failure=False)
    data = result if isinstance(result, dict) else (state.data if isinstance(state.data, dict) else {})
    print(f"\ndet-rl: {state.name}: {state.message or data.get('status', '')}")
    if data.get("runs"):
        print(f"det-rl: ledgers in {data['runs']}; compare again with: detrl verify {data['runs']}/run_a {data['runs']}/run_b")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    raise SystemExit(main())
