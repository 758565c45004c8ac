"""HF <-> Megatron-core for the Qwen2 / Llama family (GQA, optional qkv bias, tied or untied
embeddings): the name/layout mapping both ways, the GPTModel built from an HF config, and the
`dist_checkpointing` (torch_dist) checkpoint the trainer loads."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .util import atomic_dir, check_entry, entry_stamp, stamp_entry, tree_sha256

CONVERTER_VERSION = "1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> ArchMeta:
        return cls.from_hf_dict(json.loads((Path(hf_dir) / "config.json").read_text()))

    @classmethod
    def from_hf_dict(cls, c: dict) -> ArchMeta:
        model_type = c.get("model_type")
        if model_type not in ("qwen2", "llama"):
            raise ValueError(f"unsupported model_type {model_type!r} (qwen2, llama)")
        heads = c["num_attention_heads"]
        # transformers 5 keeps the rope base under rope_parameters; older configs have rope_theta
        rope = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        scaling = c.get("rope_scaling") or {}
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope scaling {scaling} is not supported by the converter")
        return cls(
            model_type=model_type, num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
            num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            ffn_hidden_size=c["intermediate_size"], vocab_size=c["vocab_size"],
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
            rope_theta=float(rope), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
        )


# ---------------------------------------------------------------- name/layout mapping

def hf_to_megatron(hf: dict[str, torch.Tensor], m: ArchMeta) -> dict[str, torch.Tensor]:
    g, d = m.num_kv_heads, m.head_dim
    hpg = m.num_heads // g
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not m.tie_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(m.num_layers):
        a, b = f"model.layers.{i}.", f"decoder.layers.{i}."
        # Megatron's fused qkv interleaves per query group: [q of the group's heads, k, v] x groups
        for kind in ("weight", "bias") if m.qkv_bias else ("weight",):
            q = hf[a + f"self_attn.q_proj.{kind}"]
            k = hf[a + f"self_attn.k_proj.{kind}"]
            v = hf[a + f"self_attn.v_proj.{kind}"]
            tail = q.shape[1:]
            qkv = torch.cat([q.reshape(g, hpg * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], 1)
            out[b + f"self_attention.linear_qkv.{kind}"] = qkv.reshape(-1, *tail)
        out[b + "self_attention.linear_proj.weight"] = hf[a + "self_attn.o_proj.weight"]
        out[b + "input_layernorm.weight"] = hf[a + "input_layernorm.weight"]
        out[b + "pre_mlp_layernorm.weight"] = hf[a + "post_attention_layernorm.weight"]
        out[b + "mlp.linear_fc1.weight"] = torch.cat([hf[a + "mlp.gate_proj.weight"], hf[a + "mlp.up_proj.weight"]], 0)
        out[b + "mlp.linear_fc2.weight"] = hf[a + "mlp.down_proj.weight"]
    return out


def megatron_to_hf(mc: dict[str, torch.Tensor], m: ArchMeta) -> dict[str, torch.Tensor]:
    g, d = m.num_kv_heads, m.head_dim
    hpg = m.num_heads // g
    out = {"model.embed_tokens.weight": mc["embedding.word_embeddings.weight"],
           "model.norm.weight": mc["decoder.final_layernorm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = mc["output_layer.weight"]
    for i in range(m.num_layers):
        a, b = f"model.layers.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias") if m.qkv_bias else ("weight",):
            qkv = mc[b + f"self_attention.linear_qkv.{kind}"]
            tail = qkv.shape[1:]
            q, k, v = qkv.reshape(g, (hpg + 2) * d, *tail).split([hpg * d, d, d], dim=1)
            out[a + f"self_attn.q_proj.{kind}"] = q.reshape(-1, *tail).contiguous()
            out[a + f"self_attn.k_proj.{kind}"] = k.reshape(-1, *tail).contiguous()
            out[a + f"self_attn.v_proj.{kind}"] = v.reshape(-1, *tail).contiguous()
        out[a + "self_attn.o_proj.weight"] = mc[b + "self_attention.linear_proj.weight"]
        out[a + "input_layernorm.weight"] = mc[b + "input_layernorm.weight"]
        out[a + "post_attention_layernorm.weight"] = mc[b + "pre_mlp_layernorm.weight"]
        gate, up = mc[b + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[a + "mlp.gate_proj.weight"] = gate.contiguous()
        out[a + "mlp.up_proj.weight"] = up.contiguous()
        out[a + "mlp.down_proj.weight"] = mc[b + "mlp.linear_fc2.weight"]
    return out


def load_hf_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


# ---------------------------------------------------------------- Megatron model

def transformer_config(m: ArchMeta, dtype: str = "float32", *, deterministic: bool = True, tp: int = 1):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_heads, num_query_groups=m.num_kv_heads, kv_channels=m.head_dim,
        normalization="RMSNorm", layernorm_epsilon=m.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", params_dtype=DTYPES[dtype],
        use_cpu_initialization=cpu, perform_initialization=False,
        # fused kernels come from CUDA extensions (absent on CPU, and a source of variance on GPU)
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        deterministic_mode=deterministic, tensor_model_parallel_size=tp,
    )


_COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "word_embeddings.weight",
                    "output_layer.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def tp_partition_dim(name: str) -> int | None:
    """The dim along which Megatron's GPT layers split a parameter over the TP ranks (None:
    replicated). By name, because Megatron marks its parameters only when it initializes them."""
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def check_tensor_parallel(m: ArchMeta, tp: int) -> None:
    """Megatron splits heads, query groups, the MLP and the vocabulary evenly over the TP ranks."""
    sizes = {"attention heads": m.num_heads, "key/value heads": m.num_kv_heads,
             "intermediate size": m.ffn_hidden_size, "vocabulary": m.vocab_size}
    bad = [f"{k} {v}" for k, v in sizes.items() if v % tp]
    if bad:
        from .config import ConfigError

        raise ConfigError(f"resources.tensor_parallel={tp} must divide the model's {', '.join(bad)}; "
                         f"choose a tensor_parallel that divides {math.gcd(*sizes.values())}")


def build_gpt_model(m: ArchMeta, dtype: str = "float32", *, deterministic: bool = True, tp: int = 1):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from . import megatron_cpu

    megatron_cpu.install()
    model = GPTModel(
        config=transformer_config(m, dtype, deterministic=deterministic, tp=tp),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=m.vocab_size, max_sequence_length=m.max_position_embeddings,
        position_embedding_type="rope", rotary_base=int(m.rope_theta),
        share_embeddings_and_output_weights=m.tie_embeddings,
    )
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


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


# ---------------------------------------------------------------- process groups

def tcp_store(host: str, port: int, world_size: int, *, is_master: bool) -> Any:
    """torch.distributed's key-value store; the master with port 0 binds one the OS picks (`.port`)."""
    from torch.distributed import TCPStore
    from torch.distributed.constants import default_pg_timeout

    return TCPStore(host, port, world_size, is_master, timeout=default_pg_timeout, wait_for_workers=False)


@contextlib.contextmanager
def model_parallel(rank: int = 0, world_size: int = 1, *, backend: str | None = None, store: Any = None,
                   tp: int = 1, seed: int = 0) -> Iterator[None]:
    """torch.distributed + Megatron parallel state for this process, meeting the other ranks through
    `store` (default: a store of its own, for one process); torn down on exit (reused as is when the
    caller already set it up)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from . import megatron_cpu

    megatron_cpu.install()
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        yield
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if store is None:
        if world_size != 1:
            raise ValueError("model_parallel: more than one rank needs the store they share")
        store = tcp_store("127.0.0.1", 0, 1, is_master=True)
    if torch.cuda.is_available():
        torch.cuda.set_device(torch.cuda.current_device())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(seed)  # the attention layers fork this tracker
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


# ---------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class ConvertedArtifact:
    path: str
    hf_sha256: str
    converter_version: str
    dtype: str


def save_dist_checkpoint(model, ckpt_dir: str | Path) -> None:
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))


def load_dist_checkpoint(model, ckpt_dir: str | Path) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    load_state_exact(model, {k: v for k, v in state.items() if not k.endswith("_extra_state")})


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, hf_sha256: str,
                       dtype: str = "float32") -> ConvertedArtifact:
    """HF safetensors -> Megatron GPTModel state -> a torch_dist checkpoint in `out_dir`, written
    under a temp name and renamed, so a crash never leaves a half checkpoint. fp32 by default:
    the trainer's master weights (an exact upcast of bf16 sources)."""
    meta = ArchMeta.from_hf_dir(hf_dir)
    with model_parallel():
        torch.manual_seed(0)
        model = build_gpt_model(meta, dtype)
        load_state_exact(model, hf_to_megatron(load_hf_state(hf_dir), meta))
        with atomic_dir(out_dir) as tmp:
            save_dist_checkpoint(model, tmp / "weights")
            art = ConvertedArtifact(path=str(out_dir), hf_sha256=hf_sha256,
                                    converter_version=CONVERTER_VERSION, dtype=dtype)
            (tmp / "detrl_conversion.json").write_text(json.dumps(
                {**asdict(art), "arch": asdict(meta), "hf_dir": str(hf_dir)}, indent=1, sort_keys=True))
            stamp_entry(tmp, weights_sha256(tmp))
        del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the driver keeps its CUDA context; the GPU memory goes to the workers
    return art


def read_conversion(out_dir: str | Path) -> ConvertedArtifact | None:
    f = Path(out_dir) / "detrl_conversion.json"
    if not f.exists() or not (Path(out_dir) / "weights").is_dir():
        return None
    d = json.loads(f.read_text())
    return ConvertedArtifact(path=str(out_dir), hf_sha256=d["hf_sha256"],
                             converter_version=d["converter_version"], dtype=d["dtype"])


def checkpoint_complete(ckpt_dir: str | Path) -> bool:
    """A torch_dist checkpoint has its metadata and at least one shard file."""
    d = Path(ckpt_dir)
    return (d / ".metadata").is_file() and (d / "metadata.json").is_file() and any(d.glob("*.distcp"))


def converted_dir(model: Any, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "megatron" / f"{model.sha256[:24]}-v{CONVERTER_VERSION}"


def weights_sha256(entry: str | Path) -> str:
    return tree_sha256(Path(entry) / "weights", hidden=True)  # torch_dist keeps its index in .metadata


def cached_conversion(model: Any, cache_dir: str | Path) -> ConvertedArtifact | None:
    """The conversion of this checkpoint content by this converter, if complete and unchanged."""
    out = converted_dir(model, cache_dir)
    existing = read_conversion(out)
    if (existing is None or existing.hf_sha256 != model.sha256 or existing.converter_version != CONVERTER_VERSION
            or not checkpoint_complete(out / "weights") or entry_stamp(out) != weights_sha256(out)):
        return None
    return existing


def convert_cached(model: Any, cache_dir: str | Path, *, refresh: bool = False) -> ConvertedArtifact:
    """Convert once per (checkpoint content, converter version). A complete entry is checked against
    the hash recorded when it was written: a changed file is a CacheError naming the entry (rebuild
    with `refresh`); an incomplete entry, or one without a record, is converted again."""
    out = converted_dir(model, cache_dir)
    existing = read_conversion(out)
    if (not refresh and existing is not None and existing.hf_sha256 == model.sha256
            and existing.converter_version == CONVERTER_VERSION and checkpoint_complete(out / "weights")
            and entry_stamp(out) is not None):
        check_entry(out, weights_sha256(out))
        return existing
    return convert_checkpoint(model.path, out, hf_sha256=model.sha256)
