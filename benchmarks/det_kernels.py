"""det-rl's residual RMSNorm for SGLang's deterministic mode (detrl.rollout.det_kernels) against
SGLang's forward_native under batch-invariant mode (what deterministic mode runs without det-rl's plugin)
and sgl_kernel's fused_add_rmsnorm (the non-deterministic default), on this GPU, without an engine: each
row bitwise equal whatever the batch size and offset, max |diff| against native, and one forward's
norms (2 a layer + the last) at 256 rows as a CUDA graph. Prints the figures and writes JSON.

    python benchmarks/det_kernels.py --json FILE [--hidden 576,896] [--layers 30]

(The record of 2026-12-01 also holds a seeded-sampler part, since removed: det-rl's one-pass version of
SGLang's multinomial_with_seed gave SGLang's tokens but only 1.1x on a 0.25 ms call.)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

BATCHES = (1, 2, 3, 7, 16, 37, 64, 100, 128, 255, 256, 511)


def cuda_time(fn: Any, repeats: int = 50) -> float:
    """Median seconds of fn() after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def rms_norm(hidden: int, layers: int) -> dict[str, Any]:
    from sgl_kernel import fused_add_rmsnorm
    from sglang.srt.batch_invariant_ops import disable_batch_invariant_mode, enable_batch_invariant_mode

    from detrl.rollout import det_kernels
    from detrl.rollout.sglang_plugin import sglang_native_add_rms_norm

    eps, bf = 1e-5, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(hidden)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(bf)

    def native(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sglang_native_add_rms_norm(x, r, w, eps)

    def fused(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, r = x.clone(), r.clone()
        fused_add_rmsnorm(x, r, w, eps)
        return x, r

    def detrl(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return det_kernels.add_rms_norm(x, r, w, eps)

    impls = {"sglang_native": native, "sgl_kernel_fused": fused, "detrl": detrl}
    big = max(BATCHES) + 64
    X = (torch.randn(big, hidden, device="cuda", generator=g) * 3).to(bf)
    R = (torch.randn(big, hidden, device="cuda", generator=g) * 3).to(bf)
    enable_batch_invariant_mode()
    try:
        out: dict[str, Any] = {}
        ref = native(X, R)
        for name, f in impls.items():
            full = f(X, R)
            bad = [
                f"{n}@{k}"
                for n in BATCHES
                for k in (0, 5)
                if not all(torch.equal(a, b[k : k + n]) for a, b in zip(f(X[k : k + n], R[k : k + n]), full))
            ]
            diff = (full[0].float() - ref[0].float()).abs()
            out[name] = {
                "batch_sizes_not_bitwise": bad,
                "max_abs_diff_vs_native": float(diff.max()),
                "elements_differing_from_native": int((diff > 0).sum()) / diff.numel(),
                "residual_equal_to_native": torch.equal(full[1], ref[1]),
            }
        for name, f in impls.items():
            x, r = X[:256].contiguous(), R[:256].contiguous()
            f(x, r)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(2 * layers + 1):
                    x, r = f(x, r)
            out[name]["forward_ms_at_256"] = cuda_time(graph.replay) * 1e3
    finally:
        disable_batch_invariant_mode()
    print(f"residual RMSNorm hidden {hidden}, {2 * layers + 1} norms a forward at 256 rows:", flush=True)
    for name, r in out.items():
        print(
            f"  {name}: {r['forward_ms_at_256']:.3f} ms a forward; not bitwise across batches: "
            f"{r['batch_sizes_not_bitwise'] or 'none'}; max |diff| vs native {r['max_abs_diff_vs_native']:.4g} "
            f"({100 * r['elements_differing_from_native']:.2f} % of elements), residual equal: "
            f"{r['residual_equal_to_native']}",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--hidden", default="576,896")
    ap.add_argument("--layers", type=int, default=30)
    a = ap.parse_args()
    from detrl.determinism import fingerprint

    result: dict[str, Any] = {"device": fingerprint("bench")["gpu"], "layers": a.layers}
    result["rms_norm"] = {h: rms_norm(int(h), a.layers) for h in a.hidden.split(",")}
    Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
