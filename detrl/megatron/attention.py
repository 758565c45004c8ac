"""Megatron's core-attention slot filled by `torch.nn.functional.scaled_dot_product_attention`.

Without TransformerEngine, Megatron-core's only attention is its local one: it materialises the
[b, heads, s, s] scores in the compute dtype, then a fp32 copy for the softmax, then the probabilities,
and its backward keeps them all (0.5B at the reference shape on an H200: a 6.81 s train step with it,
4.85 s with SDPA).
SDPA runs a fused kernel instead (FlashAttention-2 on a GPU in bf16/fp16, the math or CPU-flash kernel
in fp32). Deterministic: under `torch.use_deterministic_algorithms(True)` (det-rl's strict mode)
PyTorch runs the flash backward without its split-key atomics; cuDNN attention, whose backward has no
such guarantee, is never chosen, so determinism on and off time the same kernels.

Only causal self-attention over right-padded rows is supported (what the trainer builds): a real token
never attends to a later position, so no padding mask is needed; the pads' outputs are discarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SDPAttention(MegatronModule):
    """Drop-in for `DotProductAttention` in a layer spec (same constructor and forward signature)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: object | None = None,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if attn_mask_type != AttnMaskType.causal or attention_type != "self" or dropout:
            raise ValueError(
                f"SDPAttention supports causal self-attention without dropout, got {attn_mask_type.name} "
                f"{attention_type} attention, dropout {dropout}: use train.attention=local"
            )
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention is causal over right-padded rows: pass no mask, bias or packing")
        # [s, b, heads, d] -> [b, heads, s, d]; K/V heads repeated for grouped-query attention
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = q.size(1) // k.size(1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        with sdpa_kernel(BACKENDS):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
