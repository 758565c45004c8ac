"""det-rl's RMSNorm for SGLang's deterministic mode (`sglang_plugin` says why and how it loads), and for
the trainer's forward in exact on-policy mode (`detrl.megatron.exact`): one kernel on both sides.

`add_rms_norm` is rmsnorm(x + residual) in one program per row: the sum in float32, rounded to x's
dtype (the residual stream, as a trainer's `residual + x` stores it), then the float32 norm of that
rounded row. `rms_norm` is the same program without the addition. A row's result depends on its own
values and the hidden size alone, so it cannot depend on the batch. It is not SGLang's bits: SGLang's
native path takes the variance of the unrounded sum and reduces in another order.

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
    x_ptr,
    r_ptr,
    w_ptr,
    out_ptr,
    res_ptr,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        summed = x.to(tl.float32) + tl.load(r_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rounded = summed.to(x.dtype, fp_downcast_rounding="rtne")
        tl.store(res_ptr + row * n_cols + cols, rounded, mask=mask)
        s = rounded.to(tl.float32)
    else:
        s = x.to(tl.float32)
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
    _launch(x, residual, weight, out, res, eps)
    return out, res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight for a 2-D contiguous x: `add_rms_norm`'s program without the addition."""
    out = torch.empty_like(x)
    _launch(x, None, weight, out, None, eps)
    return out


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    res: torch.Tensor | None,
    eps: float,
) -> None:
    n_rows, n_cols = x.shape
    block = triton.next_power_of_2(n_cols)
    warps = min(max(block // 256, 4), 16)  # from the hidden size alone, like everything else here
    has_residual = residual is not None
    _add_rms_norm_kernel[(n_rows,)](
        x,
        residual if has_residual else x,
        weight,
        out,
        res if has_residual else out,
        n_cols,
        eps,
        BLOCK=block,
        HAS_RESIDUAL=has_residual,
        INTERPRET=_INTERPRET,
        num_warps=warps,
    )
