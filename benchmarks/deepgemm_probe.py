"""DeepGEMM as SGLang's batch-invariant GEMM would call it (`deep_gemm.bf16_gemm_nn(x, w.T, out)`), on
SmolLM2-135M's projection shapes: is each row's result the same whatever the batch size M, and how fast is
one forward's worth of GEMMs against cuBLAS (`determinism_cost.forward_gemm_times`)? Needs only torch, a GPU
and the `sgl-deep-gemm` wheel sglang pins (plus `apache-tvm-ffi`), no SGLang.

    python benchmarks/deepgemm_probe.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from determinism_cost import forward_gemm_times

T0 = time.perf_counter()
H, FFN, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30  # SmolLM2-135M
SHAPES = [(H, QKV), (H, H), (H, 2 * FFN), (FFN, H)]  # (K, N): qkv, o, gate_up, down
HEAD = (H, VOCAB)


def say(*a: object) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def main() -> None:
    import deep_gemm

    say("deep_gemm imported", getattr(deep_gemm, "__version__", "?"))
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)

    def dg(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], weight.shape[0], device=dev, dtype=bf)
        deep_gemm.bf16_gemm_nn(x, weight.t(), out)
        return out

    for k, n in [*SHAPES, HEAD]:  # the first rows of an M=256 product against the same rows at other M
        w = torch.randn(n, k, device=dev, dtype=bf)  # [N, K], as nn.Linear holds it
        x = torch.randn(256, k, device=dev, dtype=bf)
        full = dg(x, w)
        same = all(torch.equal(dg(x[:m].contiguous(), w), full[:m]) for m in (1, 7, 64, 200))
        diff = (full.float() - F.linear(x, w).float()).abs().max().item()
        say(f"K={k} N={n}: rows equal across M in (1,7,64,200,256): {same}; max|dg-cublas| {diff:.4f}")
    for m in (64, 256, 8192):
        med = forward_gemm_times({"deepgemm": dg, "cublas": F.linear}, SHAPES, HEAD, LAYERS, m)
        say(
            f"GEMMs of one forward at {m} tokens (CUDA graphs, median of 20): "
            f"deepgemm {med['deepgemm'] * 1e3:.2f} ms, cuBLAS {med['cublas'] * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
