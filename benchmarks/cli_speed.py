"""How fast the `detrl` commands that do no run answer: `--help`, `profiles`, a config error, and `verify`
of two finished ledgers, each in a fresh interpreter as a user types it (median of N), and whether torch
was imported on the way (it must not be).

    python benchmarks/cli_speed.py RUN_A RUN_B [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python -m detrl ARGS`, then say on stderr whether torch got imported
PROBE = """import sys, runpy
sys.argv = ['detrl', *sys.argv[1:]]
try:
    runpy.run_module('detrl', run_name='__main__')
except SystemExit as e:
    code = e.code
else:
    code = 0
print('TORCH', 'torch' in sys.modules, file=sys.stderr)
sys.exit(code)
"""


def timed(args: list[str], repeats: int) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = PROBE
    times, code, torch_loaded = [], None, None
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - t)
        code, torch_loaded = r.returncode, "TORCH True" in r.stderr
    return {"args": args, "median_s": round(statistics.median(times), 3), "exit": code, "imports_torch": torch_loaded}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    cases = {
        "help": ["--help"],
        "profiles": ["profiles"],
        "config_error": ["run", "--profile", "tiny-cpu", "--out", "/tmp/x", "--set", "train.lr=-1"],
        "verify": ["verify", a.run_a, a.run_b],
    }
    record = {name: timed(args, a.repeats) for name, args in cases.items()}
    record["cpu_count"] = os.cpu_count()
    for name, r in record.items():
        if isinstance(r, dict):
            print(f"{name}: {r['median_s']} s (exit {r['exit']}, torch imported: {r['imports_torch']})")
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
