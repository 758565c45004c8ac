"""HF <-> Megatron-core names and layouts for the Qwen2 / Llama family (GQA, optional qkv bias, tied
or untied embeddings). One table drives both directions: most tensors are renamed, and two are
fused in Megatron (q/k/v interleaved per query group, gate/up stacked)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from .layout import TABLE

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class ArchMeta:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    rope_theta: float
    norm_eps: float
    max_position_embeddings: int

    @property
    def params_per_layer(self) -> int:
        """Weights of one decoder layer's matrices (q, o; k, v; gate, up, down), biases and norms aside."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * self.ffn_hidden_size

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> ArchMeta:
        return cls.from_hf_dict(json.loads((Path(hf_dir) / "config.json").read_text()))

    @classmethod
    def from_hf_dict(cls, c: dict) -> ArchMeta:
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} ({', '.join(SUPPORTED_MODEL_TYPES)})")
        heads = c["num_attention_heads"]
        # transformers 5 keeps the rope base under rope_parameters; older configs have rope_theta
        rope = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        scaling = c.get("rope_scaling") or {}
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope scaling {scaling} is not supported by the converter")
        return cls(
            model_type=model_type,
            num_layers=c["num_hidden_layers"],
            hidden_size=c["hidden_size"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            ffn_hidden_size=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
            rope_theta=float(rope),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
        )


# Megatron name -> (the HF tensor(s) it holds, how they are fused): the converters' view of layout.TABLE
NAMES: dict[str, tuple[tuple[str, ...], str | None]] = {mc: (lay.hf, lay.fusion) for mc, lay in TABLE.items()}
_M = "decoder.layers.{}."


def _names(m: ArchMeta) -> list[tuple[str, tuple[str, ...], str | None]]:
    """(megatron, hf parts, fusion) for every tensor of this architecture: the global ones, then
    layer by layer (the order the ledger lists tensors in)."""
    skip = {"output_layer.weight"} if m.tie_embeddings else set()
    if not m.qkv_bias:
        skip.add(_M + "self_attention.linear_qkv.bias")
    rows = [(mc, hf, fusion) for mc, (hf, fusion) in NAMES.items() if mc not in skip]
    out = [row for row in rows if "{}" not in row[0]]
    for i in range(m.num_layers):
        out += [(mc.format(i), tuple(h.format(i) for h in hf), fusion) for mc, hf, fusion in rows if "{}" in mc]
    return out


def _qkv_fuse(qkv: list[torch.Tensor], m: ArchMeta) -> torch.Tensor:
    """Megatron's fused qkv interleaves per query group: [q of the group's heads, k, v] x groups."""
    q, k, v = qkv
    g, d, tail = m.num_kv_heads, m.head_dim, q.shape[1:]
    hpg = m.num_heads // g
    return torch.cat([q.reshape(g, hpg * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], 1).reshape(
        -1, *tail
    )


def _qkv_split(qkv: torch.Tensor, m: ArchMeta) -> list[torch.Tensor]:
    g, d, tail = m.num_kv_heads, m.head_dim, qkv.shape[1:]
    hpg = m.num_heads // g
    parts = qkv.reshape(g, (hpg + 2) * d, *tail).split([hpg * d, d, d], dim=1)
    return [p.reshape(-1, *tail).contiguous() for p in parts]


def hf_to_megatron(hf: dict[str, torch.Tensor], m: ArchMeta) -> dict[str, torch.Tensor]:
    out = {}
    for mc, parts, fusion in _names(m):
        tensors = [hf[p] for p in parts]
        out[mc] = _qkv_fuse(tensors, m) if fusion == "qkv" else torch.cat(tensors, 0) if fusion else tensors[0]
    return out


def megatron_to_hf(mc: dict[str, torch.Tensor], m: ArchMeta) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, parts, fusion in _names(m):
        t = mc[name]
        split = _qkv_split(t, m) if fusion == "qkv" else [c.contiguous() for c in t.chunk(2, 0)] if fusion else [t]
        out.update(zip(parts, split, strict=True))
    return out


def check_tensor_parallel(m: ArchMeta, tp: int) -> None:
    """Megatron splits heads, query groups, the MLP and the vocabulary evenly over the TP ranks."""
    sizes = {
        "attention heads": m.num_heads,
        "key/value heads": m.num_kv_heads,
        "intermediate size": m.ffn_hidden_size,
        "vocabulary": m.vocab_size,
    }
    bad = [f"{k} {v}" for k, v in sizes.items() if v % tp]
    if bad:
        raise ConfigError(
            f"resources.tensor_parallel={tp} must divide the model's {', '.join(bad)}; "
            f"choose a tensor_parallel that divides {math.gcd(*sizes.values())}"
        )


def tensor_problem(name: str, meta: ArchMeta | None = None) -> str | None:
    """Why `name` is not a trainer tensor (None if it is): a Megatron name of NAMES, and with `meta` one of
    this model's (its layer count, tied embeddings, QKV bias). Says the closest name."""
    import difflib
    import re

    if meta is None:
        known = [k for k in NAMES]
        pattern = re.sub(r"\.\d+\.", ".{}.", name, count=1)
        if pattern in known:
            return None
    else:
        known = [mc for mc, _, _ in _names(meta)]
        if name in known:
            return None
    hint = difflib.get_close_matches(name, [k.format(0) for k in known], n=1)
    return (
        f"the model has no tensor {name!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + (f"; it has {len(known)}, e.g. {known[-1]!r}" if meta is not None else "")
    )
