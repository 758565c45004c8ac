"""What importing the stack costs a fresh process, first and second time: the first import of a package
installed without bytecode (pip --no-compile, as the GPU hosts' staged stack is) compiles and writes it;
a Docker image built with pip's default has it already. Each module is imported in a fresh interpreter,
twice, and `--compile DIR` then times compiling the rest of DIR as pip would have. `--without PKG`
times each module again with PKG made unimportable (an optional dependency it would load), and
`--top N` lists the N slowest imports under each module, by `python -X importtime`.

    python benchmarks/import_time.py --json FILE [--compile /tmp/site] [--without megatron] [--top 15] [MODULE ...]
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


def _block(without: str | None) -> str:
    # a None entry in sys.modules makes `import PKG` raise ImportError, as if it were not installed
    return f"import sys; sys.modules[{without!r}] = None; " if without else ""


def import_s(module: str, without: str | None = None) -> float:
    code = f"{_block(without)}import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"import {module} failed: {out.stderr[-2000:]}")
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def slowest(module: str, n: int) -> list[list]:
    """The n imports with the largest cumulative time (children included), as [seconds, name]."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=False
    )
    rows = []
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append([round(int(parts[1]) / 1e6, 2), parts[2].rstrip()])
    return sorted(rows, reverse=True)[:n]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("modules", nargs="*", default=MODULES)
    ap.add_argument("--json", required=True)
    ap.add_argument("--compile", help="then compile this site folder's bytecode (all cores) and time it")
    ap.add_argument("--without", help="also time each module with this top-level package unimportable")
    ap.add_argument("--top", type=int, default=0, help="list this many slowest imports under each module")
    args = ap.parse_args()
    rows = {}
    for m in args.modules:  # in order: a later module's first import may reuse an earlier one's bytecode
        first = import_s(m)
        rows[m] = {"first_s": first, "second_s": import_s(m)}
        print(f"{m:34s} first {first:6.2f} s   second {rows[m]['second_s']:6.2f} s", flush=True)
        if args.without:
            rows[m][f"without_{args.without}_s"] = import_s(m, args.without)
            print(f"{m:34s} without {args.without}: {rows[m][f'without_{args.without}_s']:6.2f} s", flush=True)
        if args.top:
            rows[m]["slowest"] = slowest(m, args.top)
            for sec, name in rows[m]["slowest"]:
                print(f"    {sec:6.2f} s  {name}")
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
