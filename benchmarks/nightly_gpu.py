"""The nightly twice-run on this GPU host through the det-rl flow, cold (empty compile caches) and then
warm: wall times, a per-phase breakdown read from the ledgers (start-up parts, rollout, train, weight
sync, hash, verify), the train step's tokens/s and MFU, and the det/non-det ratios of
benchmarks/determinism_cost.py when its JSON is given. Each flow must verify identical, and once the record
holds both phases, cold and warm must end on the same final weights: a warm compile cache changes no bit.

    python benchmarks/nightly_gpu.py --json FILE [--profile gsm8k-smollm2-135m] [--cache DIR] [--out DIR]
        [--phases cold,warm] [--det determinism_cost.json] [--set k=v]

A second call with the same --json adds the phases it runs to the record (e.g. warm after cold);
`--phases ""` only merges --det into it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_step import PEAK_BF16, useful_flops


def run_breakdown(run_dir: Path) -> dict[str, Any]:
    """One run's wall time split into start-up parts and per-iteration phases, and its train speed."""
    from detrl.ledger import load_step_data, read_ledger
    from detrl.megatron.names import ArchMeta
    from detrl.trainer import Sample

    led = read_ledger(run_dir)
    assert led.header is not None and led.completion is not None, f"{run_dir}: unfinished ledger"
    meta = ArchMeta.from_hf_dir(led.header["artifacts"]["model"]["path"])
    its = [it["stats"] for it in led.iterations]
    keys = ("sync_s", "sync_export_s", "sync_load_s", "rollout_s", "train_s", "hash_s", "step_s")
    phases = {k: [round(s[k], 2) for s in its] for k in keys if k in its[0]}
    flops, tokens, train_s = 0.0, 0, 0.0
    for it, s in zip(led.iterations, its):
        arrays = load_step_data(run_dir, it["iteration"])
        if arrays is None:
            continue
        G = len(arrays["rollout_tokens_len"]) // len(arrays["prompts_len"])
        batch = [
            Sample([0] * int(p), [0] * int(r), 0.0)
            for p, r in zip(arrays["prompts_len"].repeat(G), arrays["rollout_tokens_len"])
        ]
        flops += useful_flops(meta, batch)
        tokens += sum(len(b.prompt_ids) + len(b.response_ids) for b in batch)
        train_s += s["train_s"]
    wall = led.completion["wall_s"]
    startup = led.header.get("startup_s", {})
    return {
        "wall_s": round(wall, 1),
        "startup_s": startup,
        "other_s": round(wall - sum(startup.values()) - sum(phases["step_s"]), 1),
        "phases": phases,
        "sync_s_per_update": round(statistics.mean(phases["sync_s"][1:] or phases["sync_s"]), 3),
        "train_tokens_per_s": round(tokens / train_s) if train_s else None,
        "mfu": round(flops / train_s / PEAK_BF16, 4) if train_s else None,
        "engine": led.header["engine"],
        # what the run computed, so records from two hosts or stacks can be compared bit for bit
        "iteration_hashes": [it["hashes"] for it in led.iterations],
        "final_weights": led.completion["final_weights"],
    }


def flow_once(
    profile: str, overrides: list[str], cache: Path, runs: Path, server_ready: Callable[[], None]
) -> dict[str, Any]:
    from detrl.verify import verify
    from flows.detrl_flow import detrl_flow
    from tasks.state import result_of

    # the flow's time counts what it waits for Prefect's temporary server, started ahead (flows.server):
    # what its start overlapped (the imports, which were never counted) it no longer adds
    t = t0 = time.perf_counter()
    server_ready()
    server_wait_s = time.perf_counter() - t
    state = detrl_flow(
        profile=profile, overrides=overrides, cache_dir=str(cache), runs_dir=str(runs), return_state=True
    )
    flow_s = time.perf_counter() - t
    data = result_of(state)
    if not data.get("runs"):
        raise SystemExit(f"the flow ended {state.name}: {state.message}")
    pair = Path(data["runs"])
    t = time.perf_counter()
    verdict = verify(str(pair / "run_a"), str(pair / "run_b"))
    verify_s = time.perf_counter() - t
    return {
        "flow_state": state.name,
        "verdict": verdict.status,
        "first_divergence": None if verdict.first is None else f"{verdict.first.where()}: {verdict.first.detail}",
        "likely_cause": verdict.likely_cause,
        "schedule": verdict.schedule,
        "twice": data.get("twice"),
        "flow_s": round(flow_s, 1),
        "server_wait_s": round(server_wait_s, 1),
        "twice_run_s": data.get("runs_wall_s"),  # both runs and verify, as the flow measured them
        "verify_s": round(verify_s, 2),
        "runs_dir": str(pair),
        **flow_tasks(state, t0),
        "runs": {n: run_breakdown(pair / n) for n in ("run_a", "run_b")},
    }


def flow_tasks(state: Any, t0: float) -> dict[str, dict[str, Any]]:
    """`flow_parts_s`: the flow's wall time by part, from its task runs' recorded times: the temporary
    Prefect server and the flow run's start (until the flow run began), each task (preflight,
    download-model, ...; the two runs overlap), and the flow's end. `retried_tasks`: each task that ran
    more than once, with its attempts: a retry that passed leaves the flow Completed, yet it hides a
    failure and its time counts in the part's."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    fid = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(fid)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))
    out: dict[str, float] = {}
    retried: dict[str, int] = {}
    if fr.start_time is not None:
        called = time.time() - (time.perf_counter() - t0)  # wall clock when the flow was called
        out["server_and_flow_start"] = round(fr.start_time.timestamp() - called, 1)
    for tr in sorted(tasks, key=lambda r: r.start_time or r.expected_start_time):
        if tr.start_time and tr.end_time:
            name = tr.name.rsplit("-", 1)[0]  # "download-model-7f3": the task's name and a suffix
            key = name if name not in out else f"{name}_{sum(k.startswith(name) for k in out)}"
            out[key] = round((tr.end_time - tr.start_time).total_seconds(), 1)
            if tr.run_count > 1:
                retried[key] = tr.run_count
    return {"flow_parts_s": out, "retried_tasks": retried}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--profile", default="gsm8k-smollm2-135m")
    ap.add_argument("--cache", default="/tmp/detrl-cache")
    ap.add_argument("--out", default="/tmp/detrl-nightly")
    ap.add_argument("--phases", default="cold,warm")
    ap.add_argument("--det", help="determinism_cost.py JSON to take the det/non-det ratios from")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    from flows.server import start_ahead

    server_ready = start_ahead()  # it starts while the imports below run
    from detrl.determinism import fingerprint
    from detrl.loop import compile_cache_dir

    path = Path(a.json)
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    phases = [p for p in a.phases.split(",") if p]
    if phases:  # (none: only merge --det into a record made on the GPU host)
        record.update({"profile": a.profile, "overrides": a.overrides, "device": fingerprint("driver")})
    cache = Path(a.cache)
    for phase in phases:
        if phase == "cold":
            shutil.rmtree(compile_cache_dir(cache), ignore_errors=True)
        os.environ["DETRL_CACHE"] = str(cache)
        result = flow_once(a.profile, a.overrides, cache, Path(a.out) / phase, server_ready)
        record[phase] = result
        record[f"twice_run_s_{phase}"] = result["twice_run_s"]
        print(
            f"{phase}: {result['verdict']} ({result['twice']}) twice-run {result['twice_run_s']} s, "
            f"flow {result['flow_s']} s, runs {[r['wall_s'] for r in result['runs'].values()]} s",
            flush=True,
        )
        for name, r in result["runs"].items():
            print(f"  {name}: start-up {r['startup_s']} other {r['other_s']} s; per iteration {r['phases']}")
        path.write_text(json.dumps(record, indent=1, default=str))  # what ran so far survives a time limit
    if a.det:
        det = json.loads(Path(a.det).read_text())
        record["rollout_det_ratio"] = det["rollout"]["det_over_nondet_throughput"]
        if "train" in det:
            record["train_det_ratio"] = det["train"]["nondet_over_det_time"]
    warm = record.get("warm") or record.get("cold")
    if warm:
        runs = list(warm["runs"].values())
        record["sync_s_per_iter"] = round(statistics.mean(r["sync_s_per_update"] for r in runs), 3)
        record["train_tokens_per_s"] = round(statistics.mean(r["train_tokens_per_s"] for r in runs))
        record["mfu"] = round(statistics.mean(r["mfu"] for r in runs), 4)
    ran = [record[p] for p in ("cold", "warm") if p in record and "final_weights" in record[p]["runs"]["run_a"]]
    if len(ran) == 2:  # a warm compile cache must change no bit
        record["cold_equals_warm"] = len({r["runs"][n]["final_weights"] for r in ran for n in r["runs"]}) == 1
        print(f"cold and warm ledgers end on the same weights: {record['cold_equals_warm']}")
    keys = ("twice_run_s_cold", "twice_run_s_warm", "rollout_det_ratio", "train_det_ratio", "sync_s_per_iter")
    summary = {k: record.get(k) for k in (*keys, "train_tokens_per_s", "mfu")}
    path.write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps(summary))
    same = all(record[p]["verdict"] == "identical" for p in ("cold", "warm") if p in record)
    return 0 if same and record.get("cold_equals_warm", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
