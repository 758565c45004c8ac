"""What importing the stack costs a fresh process, first and second time: the first import of a package
installed without bytecode (pip --no-compile, as the GPU hosts' staged stack is) compiles and writes it;
a Docker image built with pip's default has it already. Each module is imported in a fresh interpreter,
twice, and `--compile DIR` then times compiling the rest of DIR as pip would have.

    python benchmarks/import_time.py --json FILE [--compile /tmp/site] [MODULE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODULES = ["torch", "transformers", "ray", "prefect", "megatron.core", "sglang.srt.entrypoints.engine", "detrl.cli"]


def import_s(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"import {module} failed: {out.stderr[-2000:]}")
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("modules", nargs="*", default=MODULES)
    ap.add_argument("--json", required=True)
    ap.add_argument("--compile", help="then compile this site folder's bytecode (all cores) and time it")
    args = ap.parse_args()
    rows = {}
    for m in args.modules:  # in order: a later module's first import may reuse an earlier one's bytecode
        first = import_s(m)
        rows[m] = {"first_s": first, "second_s": import_s(m)}
        print(f"{m:34s} first {first:6.2f} s   second {rows[m]['second_s']:6.2f} s", flush=True)
    record: dict = {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0], "imports": rows}
    if args.compile:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", args.compile], check=False)
        record["compileall"] = {"dir": args.compile, "s": round(time.perf_counter() - t, 1), "cores": os.cpu_count()}
        print(f"compileall {args.compile}: {record['compileall']['s']} s on {os.cpu_count()} cores")
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
