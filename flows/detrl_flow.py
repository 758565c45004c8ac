"""The det-rl flow: download model and dataset (while Ray starts) -> run loops A and B, whose workers start
while the HF -> Megatron conversion runs and the engines' kernels build -> verify. Ends Failed
when the two runs differ, and then notifies (`notify`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Literal

# the temporary server's settings, before Prefect reads them; run as `python -m flows.detrl_flow`, the server
# also starts while the imports below run
from flows.server import start_ahead

_server_ready = start_ahead() if __name__ == "__main__" else lambda: None

from prefect import flow
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.utilities.annotations import quote

from detrl import schedule, timeouts, twice
from detrl.artifacts import converting
from detrl.cli import config_arguments
from detrl.config import PROFILES, RunConfig
from detrl.plant import parse_plants
from detrl.ray.session import shared_ray
from detrl.report import verdict_summary
from detrl.rundir import check_out_dir
from detrl.util import default_dir
from tasks.diagnose import golden_check, preflight
from tasks.loop import run_loop
from tasks.notify import check_target, notify_hook
from tasks.prepare import (
    build_attention_module,
    convert_checkpoint,
    download_dataset,
    download_model,
    resolve_config,
)
from tasks.state import result_of
from tasks.verify import verify_runs

Profile = Literal[("auto", *PROFILES)]  # type: ignore[valid-type]
FLOW_TIMEOUT_S = 6 * 3600  # a backstop: every task has a limit scaled to its config (detrl.timeouts.run)


def _run_name() -> str:
    p = flow_run.parameters
    seed = p.get("seed")
    return f"{p.get('profile', 'auto')}-seed{'default' if seed is None else seed}-{time.strftime('%m%d-%H%M%S')}"


@flow(
    name="det-rl",
    log_prints=True,
    flow_run_name=_run_name,
    timeout_seconds=FLOW_TIMEOUT_S,
    on_failure=[notify_hook],
    on_crashed=[notify_hook],
    on_completion=[notify_hook],
)
def detrl_flow(
    profile: Profile = "auto",
    seed: int | None = None,
    steps: int | None = None,
    prompts_per_step: int | None = None,
    samples_per_prompt: int | None = None,
    max_new_tokens: int | None = None,
    determinism: bool = True,
    config_file: str | None = None,
    overrides: list[str] = [],  # noqa: B006 - Prefect shows parameters, never mutates them
    plant: list[str] = [],  # noqa: B006
    notify: str | None = None,
    notify_on_success: bool = False,
    refresh: bool = False,
    cache_dir: str | None = None,
    runs_dir: str | None = None,
    golden_store: str | None = None,
    update_golden: bool = False,
) -> dict[str, Any] | State:
    """Run the GRPO loop twice from the same config and verify that every step is bit-wise identical.

    Args:
        profile: Named profile; `auto` picks the reference on a GPU host and `tiny-cpu` elsewhere.
        seed: Run seed (data order, sampling, init); empty keeps the profile's.
        steps: GRPO iterations per run; empty keeps the profile's.
        prompts_per_step: Prompts per iteration; empty keeps the profile's.
        samples_per_prompt: GRPO group size; empty keeps the profile's.
        max_new_tokens: Longest response; empty keeps the profile's.
        determinism: Off runs production kernels and unseeded sampling: the runs are expected to differ
            (GPU profiles: with `train.on_policy=approx` in overrides; exact mode needs determinism on).
        config_file: A YAML file of config keys, applied after the profile (as `detrl --config`).
        overrides: Config keys as KEY=VALUE, e.g. `train.steps=10` (see `detrl profiles --show NAME`).
        plant: Bit flips in run B as ITER:TENSOR, to prove the check catches them (the run then fails).
        notify: Where to send a failure: a webhook URL (JSON POST) or a Prefect notification block as
            TYPE/NAME; empty uses $DETRL_NOTIFY.
        notify_on_success: Also notify when the runs are identical.
        refresh: Rebuild the cached model, dataset and conversion instead of using them.
        cache_dir: Downloads and conversions; empty uses $DETRL_CACHE or ~/.cache/detrl.
        runs_dir: Where the two runs' ledgers go; empty uses $DETRL_RUNS or ~/.detrl/runs.
        golden_store: Known-good ledgers per config and hardware; empty uses $DETRL_GOLDEN or ~/.detrl/golden.
        update_golden: Make this run the known-good ledger of its config.
    """
    typed = {
        "train.steps": steps,
        "rollout.prompts_per_step": prompts_per_step,
        "rollout.samples_per_prompt": samples_per_prompt,
        "rollout.max_new_tokens": max_new_tokens,
        "determinism.enabled": determinism,
    }
    cfg = resolve_config(profile, seed, {k: v for k, v in typed.items() if v is not None}, overrides, config_file)
    parse_plants(plant, cfg)  # a flip the runs would never apply fails here, before any work
    check_target(notify)  # and a notify target that could never be reached
    out = Path(runs_dir or default_dir("runs"))
    out = check_out_dir(out / f"{time.strftime('%Y%m%d-%H%M%S')}-{flow_run.get_name() or 'local'}")
    preflight.with_options(timeout_seconds=timeouts.startup(cfg))(cfg)
    cache = cache_dir or default_dir("cache")

    # the downloads and the conversion run in the task runner's threads while this thread starts Ray (here,
    # for its signal handlers), which the runs would otherwise start after them; Ray is held for both runs
    model_f = download_model.submit(cfg, cache, refresh)
    data_f = download_dataset.submit(cfg, cache, refresh)
    # Prefect resolves the future to the model before the conversion starts; its stubs do not say so
    megatron_f = convert_checkpoint.submit(model_f, cache, refresh)  # type: ignore[call-overload]
    # and the engines' attention module and store_cache kernel are compiled beside them; the runs do not
    # wait for them (an engine that needs one mid-build waits on its build's lock)
    kernels_f = build_attention_module.submit(cfg, model_f, cache)  # type: ignore[call-overload]
    with shared_ray(cfg):
        try:
            for f in (model_f, data_f):
                f.wait()
            model, data = model_f.result(), data_f.result()
            mode, why = twice.choose(cfg, model_dir=model.path)
            b_schedule = schedule.for_run(cfg, "B").describe()
            print(f"runs A and B: {mode.replace('_', ' ')} ({why}); run B's schedule: {b_schedule}")
            start = time.monotonic()
            # the runs start their workers while the conversion runs: its future goes to them unresolved
            # (quote), and their trainers wait for it before they load the checkpoint
            megatron = quote(converting(model, cache, megatron_f.result))
            run_a, run_b = _run_twice(mode, twice.run_config(cfg, mode), out, (model, data, megatron), plant, cache)
        finally:
            for f in (megatron_f, kernels_f):
                f.wait()  # they end, however the rest did: nothing is left running
    verdict = verify_runs(run_a, run_b)

    result = {
        "status": verdict.status,
        "runs": str(out),
        "profile": cfg.profile,
        "verdict": verdict_summary(verdict),
        "twice": mode,
        "runs_wall_s": round(time.monotonic() - start, 1),
    }
    if verdict.status != "identical":
        where = f" at {verdict.first.where()}" if verdict.first else ""
        return Failed(message=f"runs {verdict.status}{where}: {verdict.likely_cause or verdict.problems}", data=result)
    gold = golden_check(run_a, golden_store or default_dir("golden"), update_golden)
    result["golden"] = gold.status
    if not gold.ok:
        return Failed(message=gold.text(), data=result)
    return result


def _run_twice(
    mode: str, cfg: RunConfig, out: Path, arts: tuple[Any, Any, Any], plant: list[str], cache: str
) -> tuple[str, str]:
    loop = run_loop.with_options(timeout_seconds=timeouts.run(cfg))
    runs: list[tuple[str, Path, list[str]]] = [("A", out / "run_a", []), ("B", out / "run_b", plant)]
    if mode == "sequential":
        done = [loop(cfg, str(d), *arts, label, p, cache) for label, d, p in runs]
        return done[0], done[1]
    # each run's workers take their own GPUs (or half of a shared one, or cores); the task runner's
    # threads overlap the two. No Prefect timeout here: in a worker thread it cannot interrupt a blocking
    # call; the runs' own phase timeouts (timeouts.*) stop a hung phase and name it.
    futures = [run_loop.submit(cfg, str(d), *arts, label, p, cache) for label, d, p in runs]
    wait(futures)
    return futures[0].result(), futures[1].result()


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.detrl_flow`: the flow once, with the `detrl` CLI's config arguments."""
    ap = argparse.ArgumentParser(
        description="Run the det-rl flow once (ephemeral Prefect unless PREFECT_API_URL is set)"
    )
    config_arguments(ap)
    a = ap.parse_args(argv)
    _server_ready()
    state = detrl_flow(
        profile=a.profile or "auto",
        config_file=a.config,
        seed=a.seed,
        overrides=a.overrides,
        plant=a.plant,
        cache_dir=a.cache,
        refresh=a.refresh,
        return_state=True,
    )
    data = result_of(state)
    print(f"\ndet-rl: {state.name}: {state.message or data.get('status', '')}")
    if data.get("runs"):
        runs = data["runs"]
        print(f"det-rl: ledgers in {runs}; compare again with: detrl verify {runs}/run_a {runs}/run_b")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    raise SystemExit(main())
