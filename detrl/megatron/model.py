"""The Megatron-core GPTModel of an HF Qwen2 / Llama config, with fusions off."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from . import cpu, exact
from .attention import SDPAttention
from .names import ArchMeta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_config(
    m: ArchMeta, dtype: str = "float32", *, deterministic: bool = True, tp: int = 1
) -> TransformerConfig:
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=m.num_kv_heads,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        params_dtype=DTYPES[dtype],
        use_cpu_initialization=on_cpu,
        perform_initialization=False,
        # fused kernels come from CUDA extensions (absent on CPU, and a source of variance on GPU)
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deterministic_mode=deterministic,
        tensor_model_parallel_size=tp,
    )


def build_gpt_model(
    m: ArchMeta,
    dtype: str = "float32",
    *,
    deterministic: bool = True,
    tp: int = 1,
    attention: str = "sdpa",
    engine_kernels: bool = False,
) -> GPTModel:
    """`attention`: "sdpa" (fused, see attention.py) or "local" (Megatron's unfused attention); call the
    model with `attention_mask(attention, ...)`. `engine_kernels`: every op runs the rollout engine's
    kernel instead (exact.py; `attention` is then unused); call it inside `exact.engine_forward`."""
    cpu.install()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if engine_kernels:
        if tp != 1:
            raise ValueError("a model with the engine's kernels needs tensor parallel 1")
        exact.install(spec)
    elif attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention != "local":
        raise ValueError(f"attention must be 'sdpa' or 'local', got {attention!r}")
    config = transformer_config(m, dtype, deterministic=deterministic, tp=tp)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        # with the engine's kernels the attention module applies the engine's rotary itself
        position_embedding_type="none" if engine_kernels else "rope",
        rotary_base=int(m.rope_theta),
        share_embeddings_and_output_weights=m.tie_embeddings,
    )
    if engine_kernels:
        exact.finish(model, config, m.hidden_size, m.rope_theta, m.max_position_embeddings)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def attention_mask(attention: str, width: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """What a model built with `attention` is called with for causal rows of `width` tokens: the
    explicit mask for local attention, None for sdpa (causal by construction)."""
    if attention == "sdpa":
        return None
    return torch.triu(torch.ones(width, width, dtype=torch.bool, device=device), 1)[None, None]


def load_state_exact(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model` (dtype-converting), failing on any missing or unexpected key."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, t in own.items():
            src = state[name]
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"{name}: shape {tuple(src.shape)} != model {tuple(t.shape)}")
            t.copy_(src.to(t.dtype))
