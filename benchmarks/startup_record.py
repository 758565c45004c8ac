"""Issue 29's start-up record from the flows one GPU job measured: each flow's parts, the before and after
of each part where a base flow ran in the same phase, and the issue's targets judged from the figures.

    python benchmarks/startup_record.py --json OUT [--what TEXT] [--steps STEPS] [--log FILE ...] LABEL=FILE ...

Each FILE is a `benchmarks/nightly_gpu.py` record and LABEL names its flow: `new` or `base` (the tree before
a change, proofs.sh's base and basewarm), with a suffix of its own if a label repeats (`new2`). A record
holding both phases counts as two flows. `--log` scans the flows' logs for WARNING and ERROR lines (issue 29
asks a clean nightly for none), for task attempts that failed (a retry that passed still hides a failure,
and its time counts in the flow's), and for each engine's CUDA-graph capture time and each kernel built ahead
(`engine_starts`); `--steps` is proofs.sh's `steps` file, whose wall seconds per step are the
processes' whole time (a flow's own figure starts at its call).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

# issue 29's "What must be true", in seconds. Its per-run start-up covers engine, env check, self-test and
# trainer; the run's other start-up parts (Ray, actors, the wait for the conversion, fingerprints) are
# counted with them here, so the figure is never flattered
COLD_FLOW_S, WARM_FLOW_S, WARM_STARTUP_S, PREFLIGHT_S, ITERATION0_SYNC_S = 150, 90, 30, 5, 1
WARNING = re.compile(r"\b(WARNING|ERROR)\b")
# Prefect's line for a task attempt that failed, logged at INFO when a retry follows
FAILED_ATTEMPT = re.compile(r"Task run failed with exception")
# SGLang's info line at the end of an engine's CUDA-graph capture (a cold engine's capture is where it waits
# for the kernels it compiles on first use), and the build-attention-module task's line per kernel built ahead
CAPTURE = re.compile(r"Capture target decode CUDA graph end\. elapsed=([\d.]+) s")
AHEAD = re.compile(r"\b(attention module|store_cache kernel) ahead: (built|found|skipped|failed)(?: in ([\d.]+) s)?")


def flows_of(label: str, path: Path) -> dict[str, dict[str, Any]]:
    """`label/phase` -> the flow's summary, for each phase the record holds."""
    record = json.loads(path.read_text())
    out = {}
    for phase in ("cold", "warm"):
        if phase not in record:
            continue
        flow = record[phase]
        runs = {}
        for name, run in flow["runs"].items():
            startup = run["startup_s"] or {}
            runs[name] = {
                "wall_s": run["wall_s"],
                "startup_s": startup,
                "startup_total_s": round(sum(startup.values()), 1),
                "rollout_s": run["phases"]["rollout_s"],
                "step_s": run["phases"]["step_s"],
                "iteration0_sync_s": run["phases"]["sync_s"][0],
                "final_weights": run["final_weights"],
            }
        out[f"{label}/{phase}"] = {
            "file": path.name,
            "device": ", ".join(record["device"]["gpu"]["names"]) if record["device"].get("gpu") else "CPU",
            "verdict": flow["verdict"],
            "flow_s": flow["flow_s"],
            "server_wait_s": flow.get("server_wait_s"),  # absent before the server started ahead
            "flow_parts_s": flow["flow_parts_s"],
            "retried_tasks": flow.get("retried_tasks"),  # absent before nightly_gpu.py recorded attempts
            "runs": runs,
        }
    if not out:
        raise SystemExit(f"{path}: no cold or warm flow in this record (is it a nightly_gpu.py record?)")
    return out


def parts(flow: dict[str, Any]) -> dict[str, float]:
    """One flat table of a flow's parts: the flow's own, then each run's start-up parts and sums."""
    out = {"flow_s": flow["flow_s"], **{f"flow.{k}": v for k, v in flow["flow_parts_s"].items()}}
    for name, run in flow["runs"].items():
        out.update({f"{name}.startup.{k}": v for k, v in run["startup_s"].items()})
        out[f"{name}.startup_total_s"] = run["startup_total_s"]
        out[f"{name}.rollout_sum_s"] = round(sum(run["rollout_s"]), 2)
        out[f"{name}.iteration0_sync_s"] = run["iteration0_sync_s"]
        out[f"{name}.wall_s"] = run["wall_s"]
    return out


def before_after(flows: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """Per phase with both a base and a new flow: part -> [base, new] (None where one lacks the part)."""
    out = {}
    for phase in ("cold", "warm"):
        base, new = flows.get(f"base/{phase}"), flows.get(f"new/{phase}")
        if base and new:
            b, n = parts(base), parts(new)
            out[phase] = {k: [b.get(k), n.get(k)] for k in [*b, *(k for k in n if k not in b)]}
    return out


def judge(value: float | list[float] | None, limit: float) -> str:
    if value is None or value == []:
        return "not measured"
    values = value if isinstance(value, list) else [value]
    shown = " / ".join(f"{v:g}" for v in values)
    return f"{'met' if max(values) <= limit else 'not met'}: {shown} s (goal {limit:g})"


def matching(logs: list[Path], pattern: re.Pattern[str]) -> list[str]:
    """Each line of the logs that `pattern` finds, after its log's name."""
    return [f"{p.name}: {line.strip()}" for p in logs for line in p.read_text().splitlines() if pattern.search(line)]


def targets(flows: dict[str, dict[str, Any]], logs: list[Path]) -> dict[str, str]:
    """Issue 29's targets, judged on the new flows only: every one of a phase (`new/warm`, `new2/warm`: a job
    that writes one record per phase labels its second flow new2), so one slow flow is never hidden."""
    news = {k: f for k, f in flows.items() if k.startswith("new")}
    new_flows = list(news.values())
    colds, warms = ([f for k, f in news.items() if k.endswith(f"/{p}")] for p in ("cold", "warm"))
    syncs = [r["iteration0_sync_s"] for f in new_flows for r in f["runs"].values()]
    lines, failed = matching(logs, WARNING), matching(logs, FAILED_ATTEMPT)
    failed += [f"{k}: {name} ran {n} times" for k, f in news.items() for name, n in (f["retried_tasks"] or {}).items()]
    attempts_known = bool(logs) or any(f["retried_tasks"] is not None for f in new_flows)
    weights = {r["final_weights"] for f in flows.values() for r in f["runs"].values()}
    return {
        "cold_flow": judge([f["flow_s"] for f in colds], COLD_FLOW_S),
        "warm_flow": judge([f["flow_s"] for f in warms], WARM_FLOW_S),
        "warm_startup_per_run": judge(
            [r["startup_total_s"] for f in warms for r in f["runs"].values()], WARM_STARTUP_S
        ),
        "preflight": judge(
            [f["flow_parts_s"]["preflight"] for f in new_flows if "preflight" in f["flow_parts_s"]], PREFLIGHT_S
        ),
        "iteration0_sync": judge(syncs, ITERATION0_SYNC_S),
        "no_warning_lines": (
            "not checked (no --log)"
            if not logs
            else f"met: none in {len(logs)} log(s)"
            if not lines
            else f"not met: {len(lines)} line(s), first: {lines[0][:300]}"
        ),
        "no_failed_attempt": (
            "not checked (no --log, and no record of attempts)"
            if not attempts_known
            else "met: every task passed on its first attempt"
            if not failed
            else f"not met: {len(failed)} failed attempt(s), first: {failed[0][:300]}"
        ),
        "same_bits": (
            f"met: final weights {weights.pop()[:16]} in all {sum(len(f['runs']) for f in flows.values())} runs"
            if len(weights) == 1 and all(f["verdict"] == "identical" for f in flows.values())
            else f"not met: verdicts {sorted({f['verdict'] for f in flows.values()})}, final weights {sorted(weights)}"
        ),
    }


def engine_starts(logs: list[Path]) -> dict[str, dict[str, Any]]:
    """Per log: each engine's CUDA-graph capture in seconds, in the log's order, and what became of each kernel
    the flow built ahead (status, and seconds where the task took any): whether the cold engines still
    waited in their capture for a kernel, beside what the build did."""
    out = {}
    for path in logs:
        text = path.read_text()
        ahead = {m[1]: m[2] + (f" in {m[3]} s" if m[3] else "") for m in AHEAD.finditer(text)}
        out[path.name] = {"capture_s": [float(x) for x in CAPTURE.findall(text)], "kernels_ahead": ahead}
    return out


def step_walls(path: Path) -> dict[str, float]:
    """proofs.sh's `steps`: NAME RC [WALLs] per line; the steps that ran to the end, with their wall time."""
    out = {}
    for line in path.read_text().splitlines():
        name, rc, *wall = line.split()
        if rc == "0" and wall:
            out[name] = float(wall[0].rstrip("s"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="the record to write")
    ap.add_argument("--what", default="", help="what ran: commits, the job's steps, the host")
    ap.add_argument("--steps", type=Path, help="proofs.sh's steps file (wall seconds per step)")
    ap.add_argument("--log", type=Path, action="append", default=[], help="a flow's log, scanned for WARNING/ERROR")
    ap.add_argument("flows", nargs="+", metavar="LABEL=FILE")
    a = ap.parse_args(argv)

    flows: dict[str, dict[str, Any]] = {}
    for item in a.flows:
        label, sep, file = item.partition("=")
        if not sep or not re.fullmatch(r"(new|base)\d*", label):
            raise SystemExit(f"{item!r}: give LABEL=FILE with LABEL new or base (new2, base2 for repeats)")
        if not Path(file).is_file():
            raise SystemExit(f"{item!r}: no file {file!r} (a benchmarks/nightly_gpu.py --json record)")
        found = flows_of(label, Path(file))
        if overlap := set(found) & set(flows):
            raise SystemExit(f"{sorted(overlap)} given twice: label the second flow new2 or base2")
        flows.update(found)
    devices = sorted({f["device"] for f in flows.values()})
    if len(devices) > 1:  # figures from two hosts are never compared (benchmarks/results/README.md)
        print(f"warning: the flows ran on {devices}; compare only same-host figures", file=sys.stderr)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "what": a.what,
        "device": devices,
        "flows": flows,
        "before_after": before_after(flows),
        "targets": targets(flows, a.log),
    }
    if a.log:
        record["engine_starts"] = engine_starts(a.log)
    if a.steps:
        record["process_wall_s"] = step_walls(a.steps)
    Path(a.json).write_text(json.dumps(record, indent=1) + "\n")
    for name, verdict in record["targets"].items():
        print(f"{name}: {verdict}")
    for phase, table in record["before_after"].items():
        for part in ("flow_s", "flow.server_and_flow_start", "run_a.startup_total_s", "run_b.startup_total_s"):
            if part in table:
                print(f"{phase} {part}: {table[part][0]} -> {table[part][1]}")
    for name, seen in record.get("engine_starts", {}).items():
        print(f"{name}: capture s {seen['capture_s']}, kernels ahead {seen['kernels_ahead']}")
    if record.get("process_wall_s"):
        print("process wall s:", json.dumps(record["process_wall_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
