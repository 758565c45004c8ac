"""The engines' attention module built ahead (detrl.rollout.attention_ahead): which module a config asks
for, when none is built, and that a build that cannot happen reports why and never raises. The build
itself runs on the GPU (tests/test_gpu.py) and in the flow there (scripts/gpu/proofs.sh)."""

from __future__ import annotations

import json
import sys

import pytest

from detrl.config import load_config
from detrl.rollout import attention_ahead
from detrl.rollout.attention_ahead import Module, build, module_for

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


def test_a_cpu_run_builds_nothing(tmp_path):
    result = build(load_config("tiny-cpu"), _model(tmp_path, **SMOLLM2), str(tmp_path / "compile"))
    assert result.status == "skipped" and "no SGLang engine on a GPU" in result.text()
    assert not (tmp_path / "compile").exists()


def test_an_unreadable_model_config_is_named(tmp_path):
    got = module_for(_gpu(), tmp_path)
    assert isinstance(got, str) and "config.json is unreadable" in got


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(_importable("flashinfer"), reason="flashinfer is importable here: its build is tests/test_gpu.py's")
def test_a_build_that_fails_reports_the_error_and_leaves_it_to_the_engines(tmp_path):
    # the process runs as on the GPU host; here it cannot import flashinfer, as on a host without it
    result = build(_gpu(), _model(tmp_path, **SMOLLM2), str(tmp_path / "compile"))
    assert result.status == "failed" and "flashinfer" in result.detail and "the engines build it" in result.detail
    assert result.seconds > 0


def test_a_build_past_its_time_is_stopped_and_reported(tmp_path, monkeypatch):
    # a process that outlives the limit: the build call returns at the limit instead of hanging the flow
    monkeypatch.setattr(Module, "argv", lambda self: [sys.executable, "-c", "import time; time.sleep(30)"])
    result = build(_gpu(), _model(tmp_path, **SMOLLM2), str(tmp_path / "compile"), timeout_s=1.0)
    assert result.status == "failed" and "not built within 1 s" in result.detail
    assert 1.0 <= result.seconds < 10


def test_the_build_process_refuses_a_dtype_flashinfer_has_no_kernels_for():
    with pytest.raises(SystemExit) as exc:
        attention_ahead.main(["--dtype", "float32", "--head-dim", "64"])
    assert exc.value.code == 2
