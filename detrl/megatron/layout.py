"""Where every tensor of a Llama/Qwen2 model lives, in one table: its Megatron name, the HF tensor(s) it
holds and how Megatron fuses them, the dim tensor parallelism splits it along, and the fused parameter
SGLang holds its HF parts in. The converters (`names`), the trainer's TP gather and the engine's
weight checksums all read it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    hf: tuple[str, ...]  # the HF tensor(s) it holds; "{}" is the layer
    fusion: str | None = None  # "qkv": interleaved per query group; "stack": concatenated; None: one tensor
    tp_dim: int | None = None  # the dim Megatron splits it along over TP ranks (None: replicated)
    sglang: str | None = None  # the parameter SGLang fuses the HF parts into ("{}" the layer)


_L, _M = "model.layers.{}.", "decoder.layers.{}."
TABLE: dict[str, Layout] = {
    "embedding.word_embeddings.weight": Layout(("model.embed_tokens.weight",), tp_dim=0),
    "decoder.final_layernorm.weight": Layout(("model.norm.weight",)),
    "output_layer.weight": Layout(("lm_head.weight",), tp_dim=0),  # only when the embeddings are untied
    _M + "self_attention.linear_qkv.weight": Layout(
        tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv", 0, _L + "self_attn.qkv_proj.weight"
    ),
    _M + "self_attention.linear_qkv.bias": Layout(
        tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv", 0, _L + "self_attn.qkv_proj.bias"
    ),
    _M + "self_attention.linear_proj.weight": Layout((_L + "self_attn.o_proj.weight",), tp_dim=1),
    _M + "input_layernorm.weight": Layout((_L + "input_layernorm.weight",)),
    _M + "pre_mlp_layernorm.weight": Layout((_L + "post_attention_layernorm.weight",)),
    _M + "mlp.linear_fc1.weight": Layout(
        (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "stack", 0, _L + "mlp.gate_up_proj.weight"
    ),
    _M + "mlp.linear_fc2.weight": Layout((_L + "mlp.down_proj.weight",), tp_dim=1),
}


def pattern(name: str) -> str:
    """A layer's tensor name with its layer index as "{}"."""
    return re.sub(r"\.\d+\.", ".{}.", name, count=1)


def layout_of(name: str) -> Layout | None:
    """The layout of a Megatron parameter name (any module prefix before it)."""
    p = pattern(name)
    for key, lay in TABLE.items():
        if p == key or p.endswith("." + key):
            return lay
    return None


def tp_partition_dim(name: str) -> int | None:
    """The dim along which Megatron's GPT layers split a parameter over the TP ranks (None:
    replicated). By name, because Megatron marks its parameters only when it initializes them."""
    lay = layout_of(name)
    return None if lay is None else lay.tp_dim


def join_tp(name: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole tensor from its TP ranks' shards. A stacked fusion is split per rank: each rank holds
    [gate_r; up_r], so the whole is [gate_0 .. gate_n; up_0 .. up_n]."""
    lay = layout_of(name)
    assert lay is not None and lay.tp_dim is not None, f"{name} is not split over TP ranks"
    if lay.fusion == "stack":
        halves = [x.chunk(len(lay.hf), dim=0) for x in parts]
        return torch.cat([h[i] for i in range(len(lay.hf)) for h in halves], 0)
    return torch.cat(list(parts), dim=lay.tp_dim)


def sglang_layout(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named Qwen2/Llama tensors -> the parameter names and fused layout SGLang holds (TP=1)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    fused = [lay for lay in TABLE.values() if lay.sglang]
    for name in named:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if not m:
            continue
        for lay in fused:
            keys = [h.format(m.group(1)) for h in lay.hf]
            if name == keys[0] and all(k in named for k in keys):
                out[str(lay.sglang).format(m.group(1))] = torch.cat([named[k] for k in keys], 0)
                used.update(keys)
    for name, t in named.items():
        if name not in used:
            out[name] = t
    return out
