"""The engines' kernels built ahead (detrl.rollout.attention_ahead), flashinfer's attention module and
SGLang's store_cache kernel: which ones a config asks for, when none is built, and that a build that
cannot happen reports why and never raises. The builds themselves run on the GPU (tests/test_gpu.py) and
in the flow there (scripts/gpu/proofs.sh)."""

from __future__ import annotations

import json
import sys

import pytest

from detrl.config import load_config
from detrl.rollout import attention_ahead
from detrl.rollout.attention_ahead import Module, StoreCache, build, module_for, store_cache_for

APPROX = "train.on_policy=approx"  # exact on-policy pins the dtype, backend and engine these tests vary
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}


def _model(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _gpu(*overrides):
    return load_config("gsm8k-smollm2-135m", overrides=list(overrides))


def test_the_module_is_the_models_head_size_in_the_engines_dtype(tmp_path):
    assert module_for(_gpu(), _model(tmp_path, **SMOLLM2)) == Module("bfloat16", 64)
    half = _gpu("rollout.sglang.dtype=float16", "train.on_policy=approx")
    assert module_for(half, _model(tmp_path, **SMOLLM2)) == Module("float16", 64)
    # an explicit head size wins over hidden_size / heads (Qwen3, Gemma)
    assert module_for(_gpu(), _model(tmp_path, **SMOLLM2, head_dim=128)) == Module("bfloat16", 128)
    # Qwen2's config names a window it does not use, and lists every layer as full attention
    qwen2 = {**SMOLLM2, "sliding_window": 32768, "use_sliding_window": False, "layer_types": ["full_attention"] * 2}
    assert module_for(_gpu(), _model(tmp_path, **qwen2)) == Module("bfloat16", 64)


@pytest.mark.parametrize(
    ("overrides", "config", "why"),
    [
        ((), {**SMOLLM2, "sliding_window": 4096}, "sliding-window"),
        ((), {**SMOLLM2, "layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
        ((), {**SMOLLM2, "attn_logit_softcapping": 50.0}, "soft-caps"),
        ((), {"model_type": "llava", "text_config": SMOLLM2}, "no head size"),
        (("rollout.sglang.attention_backend=triton", APPROX), SMOLLM2, "attention_backend=triton"),
        (("rollout.sglang.dtype=float32", APPROX), SMOLLM2, "no float32"),
        (("determinism.enabled=false", APPROX), SMOLLM2, "decode kernels"),
        (("resources.ray_address=ray://head:10001",), SMOLLM2, "cluster"),
        (("backends.rollout=hf", APPROX), SMOLLM2, "no SGLang engine"),
    ],
)
def test_no_module_is_built_where_it_may_not_be_the_engines(tmp_path, overrides, config, why):
    got = module_for(_gpu(*overrides), _model(tmp_path, **config))
    assert isinstance(got, str) and why in got, got


def test_the_store_cache_kernel_is_the_models_key_value_row(tmp_path):
    # SmolLM2: 3 key-value heads of 64 in bfloat16; Qwen2.5-0.5B: 2 of 64; a model without grouped
    # queries has as many key-value heads as heads
    assert store_cache_for(_gpu(), _model(tmp_path, **SMOLLM2)) == StoreCache(384, 384)
    qwen = {**SMOLLM2, "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2}
    assert store_cache_for(_gpu(), _model(tmp_path, **qwen)) == StoreCache(256, 256)
    mha = {k: v for k, v in SMOLLM2.items() if k != "num_key_value_heads"}
    assert store_cache_for(_gpu(), _model(tmp_path, **mha)) == StoreCache(9 * 64 * 2, 9 * 64 * 2)
    assert StoreCache(384, 384).argv()[-3:] == ["--store-cache", "384", "384"]
    # where no attention module is built ahead, no store_cache kernel is either, for the same reason
    why = store_cache_for(_gpu("rollout.sglang.attention_backend=triton", APPROX), _model(tmp_path, **SMOLLM2))
    assert isinstance(why, str) and "attention_backend=triton" in why


def test_a_cpu_run_builds_nothing(tmp_path):
    results = build(load_config("tiny-cpu"), _model(tmp_path, **SMOLLM2), str(tmp_path / "compile"))
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert results[0].text() == "attention module ahead: skipped: the run has no SGLang engine on a GPU"
    assert results[1].text() == "store_cache kernel ahead: skipped: the run has no SGLang engine on a GPU"
    assert not (tmp_path / "compile").exists()


def test_an_unreadable_model_config_is_named(tmp_path):
    got = module_for(_gpu(), tmp_path)
    assert isinstance(got, str) and "config.json is unreadable" in got


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(
    _importable("flashinfer") or _importable("sglang"),
    reason="the GPU stack is importable here: its builds are tests/test_gpu.py's",
)
def test_a_build_that_fails_reports_the_error_and_leaves_it_to_the_engines(tmp_path):
    # the processes run as on the GPU host; here they cannot import flashinfer or SGLang, as on a host without them
    attention, store = build(_gpu(), _model(tmp_path, **SMOLLM2), str(tmp_path / "compile"))
    assert attention.status == "failed" and "flashinfer" in attention.detail
    assert store.status == "failed" and "sglang" in store.detail
    for r in (attention, store):
        assert "the engines build it" in r.detail and r.seconds > 0
    assert store.text().startswith("store_cache kernel ahead: failed in ")


def test_a_store_cache_kernel_in_the_workers_cache_is_found_without_a_process(tmp_path, monkeypatch):
    # the module SGLang would load (its name: the arguments, then a hash of its source), in the tvm-ffi
    # cache the workers are given; a process started anyway would fail the test through its argv
    monkeypatch.delenv("TVM_FFI_CACHE_DIR", raising=False)
    name = "sgl_kernel_jit_kvcache_384_384_true_0123abcd"
    folder = tmp_path / "compile" / "tvm-ffi" / name
    folder.mkdir(parents=True)
    (folder / f"{name}.so").write_bytes(b"")
    monkeypatch.setattr(StoreCache, "argv", lambda self: [sys.executable, "-c", "raise SystemExit(3)"])
    monkeypatch.setattr(Module, "argv", lambda self: [sys.executable, "-c", "raise SystemExit(4)"])
    attention, store = build(_gpu(), _model(tmp_path, **SMOLLM2), str(tmp_path / "compile"))
    assert store.status == "found" and name in store.detail and store.seconds < 1, store
    assert attention.status == "failed" and "exit 4" in attention.detail  # its process ran as before
    # another row width is not taken for this one
    assert StoreCache(256, 256).built({"TVM_FFI_CACHE_DIR": str(tmp_path / "compile" / "tvm-ffi")}) == []


def test_a_build_past_its_time_is_stopped_and_reported(tmp_path, monkeypatch):
    # processes that outlive the limit: the build call returns at the limit instead of hanging the flow,
    # and the two run at once (both stopped at the one limit, not one after the other)
    for kernel in (Module, StoreCache):
        monkeypatch.setattr(kernel, "argv", lambda self: [sys.executable, "-c", "import time; time.sleep(30)"])
    results = build(_gpu(), _model(tmp_path, **SMOLLM2), str(tmp_path / "compile"), timeout_s=1.0)
    for r in results:
        assert r.status == "failed" and "not built within 1 s" in r.detail
        assert 1.0 <= r.seconds < 5


def test_the_build_process_refuses_a_dtype_flashinfer_has_no_kernels_for():
    with pytest.raises(SystemExit) as exc:
        attention_ahead.main(["--dtype", "float32", "--head-dim", "64"])
    assert exc.value.code == 2


def test_the_build_process_asks_for_one_kernel(capsys):
    with pytest.raises(SystemExit) as exc:
        attention_ahead.main(["--dtype", "bfloat16"])
    assert exc.value.code == 2 and "--store-cache ROW_BYTES V_ROW_BYTES" in capsys.readouterr().err
