"""The object_store weight-sync payload, as torch tensors (how it travelled before) and as
`detrl.weight_sync.object_store.pack` makes it, side by side in one invocation: the trainer's side
(`ray.put`, which serializes into the object store) and the engine's side (`ray.get` in another actor,
then `unpack` and a copy of every tensor into the engine's own, as its load does), over the tensors of
a real model in the engine's dtype. Alternating repeats; the median of each is reported, with the ratio.

    python benchmarks/object_store_sync.py --json FILE [--model DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file

from detrl.weight_sync import object_store


@ray.remote(num_cpus=0)
class Reader:
    """The engine's side: get the payload and copy every tensor into a parameter it holds, as the hf
    engine's `update_weights` does (so both forms pay for reading every byte once)."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}

    def read(self, refs: list, packed: bool) -> float:
        # the reference inside a list: Ray passes it as is, so the get is timed here, not before the call
        t = time.perf_counter()
        payload = ray.get(refs[0])
        tensors = object_store.unpack(payload) if packed else payload
        with torch.no_grad():
            for k, v in tensors.items():
                if k not in self.params:
                    self.params[k] = torch.empty_like(v)
                self.params[k].copy_(v)
        return time.perf_counter() - t


def model_tensors(model: str | None) -> tuple[str, dict[str, torch.Tensor]]:
    if model is None:  # SmolLM2-135M, as det-rl's CPU profile prepares it
        from detrl.config import load_config
        from detrl.loop import prepare

        arts = prepare(load_config("smollm2-cpu"), Path("/tmp/detrl-bench-cache"))
        model = arts.model.path
    files = sorted(Path(model).glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update({k: v.float().contiguous() for k, v in load_file(str(f)).items()})
    return model, tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--model", default=None, help="an HF checkpoint folder (default: SmolLM2-135M, prepared)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, tensors = model_tensors(args.model)
    mib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    ray.init(include_dashboard=False, logging_level="ERROR")
    reader = Reader.remote()
    ray.get(reader.read.remote([ray.put({"x": torch.zeros(1)})], False))  # the actor is up
    runs: dict[str, dict[str, list[float]]] = {k: {"put_s": [], "get_s": []} for k in ("torch", "packed")}
    for _ in range(args.repeats):
        for kind in ("torch", "packed"):
            t = time.perf_counter()
            ref = ray.put(object_store.pack(tensors) if kind == "packed" else tensors)
            runs[kind]["put_s"].append(time.perf_counter() - t)
            runs[kind]["get_s"].append(ray.get(reader.read.remote([ref], kind == "packed")))
            del ref
    ray.shutdown()
    med = {k: {p: round(statistics.median(v), 3) for p, v in parts.items()} for k, parts in runs.items()}
    total = {k: m["put_s"] + m["get_s"] for k, m in med.items()}
    out = {
        "what": "object_store weight-sync payload: torch tensors (before) against pack/unpack (after), "
        "ray.put in the driver; in another actor ray.get, unpack and a copy of every tensor into held ones "
        "(the engine's load), median of alternating repeats",
        "model": model,
        "tensors": len(tensors),
        "payload_mib": round(mib, 1),
        "dtype": "float32",
        "repeats": args.repeats,
        "median_s": med,
        "torch_over_packed": round(total["torch"] / total["packed"], 1),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(json.dumps(out, indent=1))
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
