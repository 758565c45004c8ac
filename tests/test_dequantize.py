"""The GGUF header check (unit tier): det-rl's lean header read must agree with gguf-py's full reader
on every field and tensor type it reports, and refuse a damaged file with the file's name."""

from pathlib import Path

import numpy as np
import pytest

from detrl.config import SMOLLM2_GGUF, ConfigError
from detrl.dequantize import inspect_gguf, read_header, resolve_gguf

gguf = pytest.importorskip("gguf")  # a dependency of the project: present wherever its tests run


def _reference(path: Path) -> tuple[dict[str, object], dict[str, int]]:
    """gguf-py's reading of the same header: scalar and string fields, tensors per type."""
    r = gguf.GGUFReader(str(path))
    fields = {
        k: f.contents()
        for k, f in r.fields.items()
        if not k.startswith("GGUF.") and f.types and f.types[0] != gguf.GGUFValueType.ARRAY
    }
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return fields, types


def _write(path: Path) -> Path:
    """A header with every kind of field the lean read must step over: arrays of strings, of numbers,
    and of arrays, next to scalars of several widths, and tensors of two types."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_token_list(["<s>", "</s>", "héllo", ""])
    w.add_token_scores([0.0, -1.5, 2.25, 3.0])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_uint8("test.u8", 7)
    w.add_int64("test.i64", -(2**40))
    w.add_float64("test.f64", 0.1)
    w.add_bool("test.flag", True)
    w.add_eos_token_id(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    w.add_tensor("output.weight", np.zeros((2, size), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("which", ["written", "smollm2"])
def test_the_lean_header_read_agrees_with_gguf_py(tmp_path, which):
    path = _write(tmp_path / "m.gguf") if which == "written" else resolve_gguf(SMOLLM2_GGUF)
    fields, types = read_header(path, gguf)
    ref_fields, ref_types = _reference(path)
    assert types == ref_types and sum(types.values()) > 1
    assert {k: fields[k] for k in ref_fields} == ref_fields
    assert set(fields) - set(ref_fields) == {k for k, v in fields.items() if v is None}  # the arrays, skipped
    info = inspect_gguf(str(path))
    assert info.architecture == "llama" and info.tensor_types == ref_types
    assert info.eos_token_id == ref_fields["tokenizer.ggml.eos_token_id"]


@pytest.mark.parametrize("cut", [3, 40, -20])
def test_a_damaged_gguf_is_refused_with_its_name(tmp_path, cut):
    whole = _write(tmp_path / "whole.gguf").read_bytes()
    header_end = whole.index(b"output.weight") + 60  # past the last tensor's info
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(whole[: cut if cut > 0 else header_end + cut])
    with pytest.raises(ConfigError, match=r"bad\.gguf is not a readable GGUF file"):
        inspect_gguf(str(bad))
