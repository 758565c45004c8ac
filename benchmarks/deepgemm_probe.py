"""DeepGEMM as SGLang's batch-invariant GEMM would call it (`deep_gemm.bf16_gemm_nn(x, w.T, out)`), on
SmolLM2-135M's projection shapes: is each row's result the same whatever the batch size M, and how fast is
one forward's worth of GEMMs against cuBLAS (CUDA graphs, median of 20)? Needs only torch, a GPU and the
`sgl-deep-gemm` wheel sglang pins (plus `apache-tvm-ffi`), no SGLang.

    python benchmarks/deepgemm_probe.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

T0 = time.perf_counter()
H, FFN, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30  # SmolLM2-135M
SHAPES = [(H, QKV), (H, H), (H, 2 * FFN), (FFN, H), (H, VOCAB)]  # (K, N): qkv, o, gate_up, down, LM head


def say(*a: object) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def main() -> None:
    import deep_gemm

    say("deep_gemm imported", getattr(deep_gemm, "__version__", "?"))
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    w = {s: torch.randn(s[1], s[0], device=dev, dtype=bf) for s in SHAPES}  # [N, K], as nn.Linear holds it

    def dg(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], weight.shape[0], device=dev, dtype=bf)
        deep_gemm.bf16_gemm_nn(x, weight.t(), out)
        return out

    for k, n in SHAPES:  # the first rows of an M=256 product against the same rows at other M
        x = torch.randn(256, k, device=dev, dtype=bf)
        full = dg(x, w[(k, n)])
        same = all(torch.equal(dg(x[:m].contiguous(), w[(k, n)]), full[:m]) for m in (1, 7, 64, 200))
        diff = (full.float() - F.linear(x, w[(k, n)]).float()).abs().max().item()
        say(f"K={k} N={n}: rows equal across M in (1,7,64,200,256): {same}; max|dg-cublas| {diff:.4f}")
    for m in (64, 256, 8192):
        xs = {k: torch.randn(m, k, device=dev, dtype=bf) for k in (H, FFN)}

        def forward(lin: Callable[..., torch.Tensor], xs: dict[int, torch.Tensor] = xs) -> None:
            for _ in range(LAYERS):
                for k, n in SHAPES[:4]:
                    lin(xs[k], w[(k, n)])
            lin(xs[H], w[(H, VOCAB)])

        graphs = {}
        for name, lin in (("deepgemm", dg), ("cublas", F.linear)):
            forward(lin)
            torch.cuda.synchronize()
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name]):
                forward(lin)
        times: dict[str, list[float]] = {k: [] for k in graphs}
        for r in range(20):
            for k in list(graphs) if r % 2 == 0 else list(graphs)[::-1]:
                torch.cuda.synchronize()
                t = time.perf_counter()
                graphs[k].replay()
                torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
        med = {k: sorted(v)[10] * 1e3 for k, v in times.items()}
        say(
            f"GEMMs of one forward at {m} tokens (CUDA graphs, median of 20): "
            f"deepgemm {med['deepgemm']:.2f} ms, cuBLAS {med['cublas']:.2f} ms"
        )


if __name__ == "__main__":
    main()
