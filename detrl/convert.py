"""HF -> Megatron-core conversion as a cache entry: the model's torch_dist checkpoint, converted once
per (checkpoint content, converter version) and checked against its recorded hash on every use.
The name table and Megatron helpers it uses live in `detrl.megatron`; Megatron itself is imported only
when a conversion runs (a cached entry is checked without it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .megatron.checkpoint import checkpoint_complete, load_hf_state, save_dist_checkpoint
from .megatron.names import ArchMeta, hf_to_megatron
from .util import atomic_dir, check_entry, entry_stamp, stamp_entry, tree_sha256

CONVERTER_VERSION = "1"


@dataclass(frozen=True)
class ConvertedArtifact:
    path: str
    hf_sha256: str
    converter_version: str
    dtype: str


def convert_checkpoint(
    hf_dir: str | Path, out_dir: str | Path, *, hf_sha256: str, dtype: str = "float32"
) -> ConvertedArtifact:
    """HF safetensors -> Megatron GPTModel state -> a torch_dist checkpoint in `out_dir`, written
    under a temp name and renamed, so a crash never leaves a half checkpoint. fp32 by default:
    the trainer's master weights (an exact upcast of bf16 sources)."""
    from .megatron.model import build_gpt_model, load_state_exact
    from .megatron.parallel import model_parallel

    meta = ArchMeta.from_hf_dir(hf_dir)
    with model_parallel():
        torch.manual_seed(0)
        model = build_gpt_model(meta, dtype)
        load_state_exact(model, hf_to_megatron(load_hf_state(hf_dir), meta))
        with atomic_dir(out_dir) as tmp:
            save_dist_checkpoint(model, tmp / "weights")
            art = ConvertedArtifact(
                path=str(out_dir), hf_sha256=hf_sha256, converter_version=CONVERTER_VERSION, dtype=dtype
            )
            (tmp / "detrl_conversion.json").write_text(
                json.dumps({**asdict(art), "arch": asdict(meta), "hf_dir": str(hf_dir)}, indent=1, sort_keys=True)
            )
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
    return ConvertedArtifact(
        path=str(out_dir), hf_sha256=d["hf_sha256"], converter_version=d["converter_version"], dtype=d["dtype"]
    )


def converted_dir(model: Any, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "megatron" / f"{model.sha256[:24]}-v{CONVERTER_VERSION}"


def weights_sha256(entry: str | Path) -> str:
    return tree_sha256(Path(entry) / "weights", hidden=True)  # torch_dist keeps its index in .metadata


def convert_cached(model: Any, cache_dir: str | Path, *, refresh: bool = False) -> ConvertedArtifact:
    """Convert once per (checkpoint content, converter version). A complete entry is checked against
    the hash recorded when it was written: a changed file is a CacheError naming the entry (rebuild
    with `refresh`); an incomplete entry, or one without a record, is converted again."""
    out = converted_dir(model, cache_dir)
    existing = read_conversion(out)
    if (
        not refresh
        and existing is not None
        and existing.hf_sha256 == model.sha256
        and existing.converter_version == CONVERTER_VERSION
        and checkpoint_complete(out / "weights")
        and entry_stamp(out) is not None
    ):
        check_entry(out, weights_sha256(out))
        return existing
    return convert_checkpoint(model.path, out, hf_sha256=model.sha256)
