"""det-rl's residual RMSNorm for SGLang's deterministic mode (`sglang_plugin` says why and how it loads).

`add_rms_norm` is rmsnorm(x + residual) with SGLang's native arithmetic (float32 sum, the residual
rounded to x's dtype, float32 variance of the unrounded sum) in one program per row. A row's result
depends on its own values and the hidden size alone, so it cannot depend on the batch. It is not
SGLang's bits: its native path reduces in another order (1 bfloat16 ulp at most, measured).

Triton exists only beside a CUDA torch; `TRITON_INTERPRET=1` runs it on the CPU (the tests), with the
interpreter's rsqrt in place of libdevice's, which the interpreter lacks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, n_cols, eps, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    s = x.to(tl.float32) + tl.load(r_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_ptr + row * n_cols + cols, s.to(x.dtype, fp_downcast_rounding="rtne"), mask=mask)
    var = tl.math.div_rn(tl.sum(s * s, axis=0), n_cols.to(tl.float32))
    if INTERPRET:
        inv = tl.rsqrt(var + eps)
    else:
        inv = libdevice.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, ((s * inv) * w).to(x.dtype, fp_downcast_rounding="rtne"), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) for 2-D contiguous x and residual of one dtype."""
    out, res = torch.empty_like(x), torch.empty_like(residual)
    n_rows, n_cols = x.shape
    block = triton.next_power_of_2(n_cols)
    warps = min(max(block // 256, 4), 16)  # from the hidden size alone, like everything else here
    _add_rms_norm_kernel[(n_rows,)](
        x, residual, weight, out, res, n_cols, eps, BLOCK=block, INTERPRET=_INTERPRET, num_warps=warps
    )
    return out, res
