"""Where sampled time went, from py-spy's raw output (`py-spy record --subprocesses --idle --format raw`,
with or without `--threads`; scripts/gpu/proofs.sh's `profile` step): per process, the seconds under a
frame that a filter names, split by the frames beneath it.

    python benchmarks/stack_split.py FILE[.gz] --rate 25 [--process TEXT] [--under REGEX] [--top 30]

`--under` keeps the samples whose stack holds a frame that REGEX matches (e.g. `capture_one_shape`) and
reports the frames beneath it; inclusive seconds count a frame once per sample.
"""

from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")


def read(path: Path) -> list[tuple[list[str], int]]:
    """The samples: (frames from the root down, count). A process started as `python -c CODE` has newlines
    in its command line, which py-spy writes as they are: a sample ends where its quotes are balanced."""
    opener = gzip.open if path.suffix == ".gz" else open
    out, pending = [], ""
    with opener(path, "rt", errors="replace") as f:  # type: ignore[operator]
        for line in f:
            pending += line.rstrip("\n")
            m = _LINE.match(pending)
            if m and pending.count('"') % 2 == 0:
                out.append((m.group(1).split(";"), int(m.group(2))))
                pending = ""
            elif m is None and '"' not in pending:
                pending = ""  # not a sample line
            else:
                pending += " "
    return out


def short(frame: str) -> str:
    """`func (path/to/pkg/mod.py:12)` -> `func (pkg/mod.py)`: lines differ per sample, functions do not."""
    m = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    parts = m.group(2).split("/")
    return f"{m.group(1)} ({'/'.join(parts[-2:])})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--rate", type=float, default=25.0, help="py-spy's --rate (samples per second)")
    ap.add_argument("--process", default="", help="keep processes whose name contains this")
    ap.add_argument("--under", default="", help="keep samples under a frame this regex matches")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args(argv)
    under = re.compile(a.under)
    per_proc: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for stack, n in read(a.file):
        # with --subprocesses, each sample names its process's ancestors first: the last is its own
        proc = next((f for f in reversed(stack) if f.startswith("process ")), "(one process: --pid)")
        if a.process not in proc:
            continue
        if a.under:
            at = next((i for i, f in enumerate(stack) if under.search(f)), None)
            if at is None:
                continue
            below = stack[at:]
        else:  # the process and thread frames are not code
            below = [f for f in stack if not f.startswith(("process ", "thread "))]
        per_proc[proc[:110]] += n
        # importlib's own frames sit between every two imports and would fill the list: the `<module>` frames
        # name the imports, and the leaf seconds keep what importlib itself spent (reading files, compiling)
        for f in {short(f) for f in below if "<frozen importlib" not in f}:
            inclusive[f] += n
        if below:
            leaf[short(below[-1])] += n
    s = 1.0 / a.rate
    print(f"# {a.file.name}: under {a.under or '(all)'!r}, processes matching {a.process or '(all)'!r}")
    print("## seconds per process")
    for p, n in per_proc.most_common(a.top):
        print(f"{n * s:8.1f}  {p}")
    print("## inclusive seconds (all matching processes summed)")
    for f, n in inclusive.most_common(a.top):
        print(f"{n * s:8.1f}  {f}")
    print("## leaf seconds")
    for f, n in leaf.most_common(a.top):
        print(f"{n * s:8.1f}  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
