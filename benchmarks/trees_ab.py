"""One `detrl` command on two or more source trees, alternated round by round on this machine, so that a
change's effect on wall time is measured side by side rather than against a figure from another day:
the wall time of each command and the start-up parts each run's ledger recorded.

    python benchmarks/trees_ab.py --tree base=/tmp/wt-base --tree new=. --rounds 4 --json FILE \
        -- run --profile tiny-cpu

Each tree runs with the same interpreter (this one) and its own cache, filled by an untimed first round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detrl.ledger import LEDGER_FILE, read_ledger


def _startup(out: Path) -> dict[str, Any]:
    """Each run's `startup_s` from its ledger header (a `run` writes one ledger, `reproduce` two)."""
    found = {}
    for led in sorted(out.rglob(LEDGER_FILE)):
        header = read_ledger(led).header or {}
        found[led.parent.name] = header.get("startup_s", {})
    return found


def once(tree: Path, args: list[str], cache: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "DETRL_CACHE": str(cache)}
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "detrl", *args, "--out", str(out)], cwd=tree, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{tree}: `detrl {' '.join(args)}` exited {r.returncode}:\n{r.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "startup_s": _startup(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH, at least two")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, after one untimed round")
    ap.add_argument("--json", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the detrl command (no --out)")
    a = ap.parse_args(argv)
    bad = [t for t in a.tree if "=" not in t or not (Path(t.split("=", 1)[1]) / "detrl").is_dir()]
    if bad:
        ap.error(f"--tree wants NAME=PATH, PATH a source tree with detrl/ in it: {bad}")
    trees = dict(t.split("=", 1) for t in a.tree)
    args = [x for x in a.args if x != "--"]
    if len(trees) < 2 or not args:
        ap.error("give two or more --tree NAME=PATH and a detrl command after --")
    work = Path(tempfile.mkdtemp(prefix="trees-ab-"))
    runs: list[dict[str, Any]] = []
    for rnd in range(a.rounds + 1):
        # the order turns each round, so that neither tree always follows the other
        names = list(trees)[rnd % len(trees) :] + list(trees)[: rnd % len(trees)]
        for name in names:
            res = once(Path(trees[name]).resolve(), args, work / f"cache-{name}", work / f"out-{name}-{rnd}")
            print(f"round {rnd} {name}: {res['wall_s']} s", flush=True)
            runs.append({"round": rnd, "tree": name, **res})
    timed = [r for r in runs if r["round"] > 0]
    summary = {}
    for name in trees:
        walls = [r["wall_s"] for r in timed if r["tree"] == name]
        starts = [sum(s.values()) for r in timed if r["tree"] == name for s in r["startup_s"].values()]
        summary[name] = {
            "wall_s": walls,
            "wall_median_s": round(statistics.median(walls), 2),
            "startup_sum_median_s": round(statistics.median(starts), 2) if starts else None,
        }
        print(f"{name}: wall median {summary[name]['wall_median_s']} s of {walls}")
    rec = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": f"detrl {' '.join(args)} --out OUT (DETRL_CACHE per tree; round 0 untimed)",
        "trees": trees,
        "note": a.note,
        "summary": summary,
        "runs": runs,
    }
    Path(a.json).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
