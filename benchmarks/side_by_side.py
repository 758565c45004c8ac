"""Runs A and B side by side (one GPU each) against the same pair run sequentially, through the flow.

    python benchmarks/gpu_proof.py --mode flow --set resources.twice=side_by_side --out DIR1 --json S.json
    python benchmarks/gpu_proof.py --mode flow --set resources.twice=sequential --out DIR2 --json Q.json
    python benchmarks/side_by_side.py S.json Q.json --json RESULT.json

This script reads both records, proves every ledger of the side-by-side pair equals the matching
ledger of the sequential pair (and each pair is identical within), and prints the wall-time ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("side_by_side", help="gpu_proof.py --mode flow record with resources.twice=side_by_side")
    ap.add_argument("sequential", help="the same with resources.twice=sequential")
    ap.add_argument("--json", required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    from detrl.ledger import read_ledger
    from detrl.verify import verify

    recs = {
        k: json.loads(Path(p).read_text()) for k, p in (("side_by_side", a.side_by_side), ("sequential", a.sequential))
    }
    for k, r in recs.items():
        if r.get("twice") != k:
            raise SystemExit(f"{getattr(a, k)} ran {r.get('twice')!r}, not {k}")
    dirs = {k: Path(r["runs_dir"]) for k, r in recs.items()}
    pairs = {
        f"{x}/{ra} vs {y}/{rb}": verify(str(dirs[x] / ra), str(dirs[y] / rb)).status
        for x, ra, y, rb in [
            ("side_by_side", "run_a", "side_by_side", "run_b"),
            ("sequential", "run_a", "sequential", "run_b"),
            ("side_by_side", "run_a", "sequential", "run_a"),
            ("side_by_side", "run_b", "sequential", "run_b"),
            ("side_by_side", "run_b", "sequential", "run_a"),
        ]
    }
    side, seq = recs["side_by_side"], recs["sequential"]
    gpus = {
        f"{n}/{role}": fp.get("gpu", {}).get("visible_devices")
        for n in ("run_a", "run_b")
        for role, fp in read_ledger(dirs["side_by_side"] / n).header["fingerprints"].items()
        if role != "driver"
    }
    out = {
        "profile": side["profile"],
        "commands": {k: r["command"] for k, r in recs.items()},
        "device": side["device"].get("gpu"),
        "note": a.note,
        "flow_wall_s": {k: r["flow"]["wall_s"] for k, r in recs.items()},
        "twice_run_s": {k: r["twice_run_s"] for k, r in recs.items()},
        "run_wall_s": {k: r["run_wall_s"] for k, r in recs.items()},
        "speedup_twice_run": round(seq["twice_run_s"] / side["twice_run_s"], 3),
        "speedup_flow": round(seq["flow"]["wall_s"] / side["flow"]["wall_s"], 3),
        "verdicts": pairs,
        "all_identical": all(v == "identical" for v in pairs.values()),
        "final_weights": {
            f"{k}/{n}": read_ledger(dirs[k] / n).completion["final_weights"] for k in recs for n in ("run_a", "run_b")
        },
        "side_by_side_gpus": gpus,
    }
    Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: out[k] for k in ("flow_wall_s", "twice_run_s", "speedup_twice_run", "verdicts")}, indent=1))
    return 0 if out["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
