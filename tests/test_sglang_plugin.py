"""det-rl's kernel for SGLang's deterministic mode, on the CPU: the plugin record reaches a spawned
process (as SGLang starts its schedulers) and names `install`; `install` patches nothing unless asked and
reports a failure that SGLang itself would only log; the engine refuses to run on that report. The
Triton kernel runs under Triton's interpreter against the arithmetic it stands for (its batch
invariance on a GPU, and its distance from SGLang's own code, are tests in test_gpu.py)."""

import importlib
import multiprocessing as mp
import os
import sys

import pytest
import torch

from detrl.config import is_semantic, load_config
from detrl.rollout import sglang_plugin


@pytest.fixture
def clean_env(monkeypatch):
    for key in (sglang_plugin.ENABLE_ENV, sglang_plugin.REPORT_ENV, "SGLANG_PLUGINS"):
        monkeypatch.setenv(key, "")  # recorded, so what the test sets is undone after it
        monkeypatch.delenv(key)
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setattr(sys, "path", list(sys.path))


def _plugins_seen_by_a_spawned_child(queue):
    from importlib.metadata import entry_points

    queue.put([(ep.name, ep.value, ep.load().__name__) for ep in entry_points(group="sglang.srt.plugins")])


def test_a_spawned_process_finds_the_plugin(tmp_path, clean_env, monkeypatch):
    monkeypatch.setenv("SGLANG_PLUGINS", "someone_elses")
    root = sglang_plugin.plugin_env(tmp_path / "plugin")
    assert sglang_plugin.plugin_env(tmp_path / "plugin") == root  # idempotent
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(root), "/somewhere"]
    assert os.environ["SGLANG_PLUGINS"] == "someone_elses,detrl_kernels"  # a user's list would skip ours
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_plugins_seen_by_a_spawned_child, args=(queue,))
    child.start()
    seen = queue.get(timeout=120)
    child.join(60)
    assert ("detrl_kernels", "detrl.rollout.sglang_plugin:install", "install") in seen


def _import_error_in_a_spawned_child(queue, name):
    try:
        importlib.import_module(name)
        queue.put(None)
    except ImportError as e:
        queue.put((type(e).__name__, str(e)))


def test_a_hidden_package_cannot_be_imported_by_a_spawned_process(tmp_path, clean_env):
    # `megatron` (a namespace package, cheap to import) stands for megatron.core, whose import starts with it
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_import_error_in_a_spawned_child, args=(queue, "megatron"))
    child.start()
    assert queue.get(timeout=120) is None  # installed here, so importable before it is hidden
    child.join(60)
    sglang_plugin.hide(tmp_path / "hidden", ("megatron",))
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "hidden"), "/somewhere"]
    child = ctx.Process(target=_import_error_in_a_spawned_child, args=(queue, "megatron.core"))
    child.start()
    kind, why = queue.get(timeout=120)
    child.join(60)
    assert kind == "ModuleNotFoundError" and "hidden from the rollout process tree by det-rl" in why


def test_install_patches_only_when_asked_and_reports_a_failure(clean_env):
    folder = sglang_plugin.request(False)
    sglang_plugin.install()  # not asked: returns before importing SGLang
    assert sglang_plugin.read_reports(folder) == {}
    folder = sglang_plugin.request(True)
    with pytest.raises(ImportError):  # no SGLang on this machine
        sglang_plugin.install()
    got = sglang_plugin.read_reports(folder)
    assert list(got) == [os.getpid()] and "sglang" in got[os.getpid()]["error"]
    assert not folder.exists()


def test_the_engine_refuses_a_silent_fallback_and_names_the_fix():
    from detrl.rollout.sglang import SGLangEngine

    eng = object.__new__(SGLangEngine)
    eng.engine = None
    patched = {"patched": list(sglang_plugin.PATCHED)}
    for reports in (
        {},  # no process loaded it
        {os.getpid(): patched},  # only the engine's own process: no scheduler was patched
        {os.getpid() + 1: patched, os.getpid() + 2: {"error": "ImportError: no triton"}},
    ):
        with pytest.raises(RuntimeError, match="rollout.sglang.kernels=sglang"):
            eng._check_plugin(reports)
    eng._check_plugin({os.getpid(): patched, os.getpid() + 1: patched})
    assert eng.plugin == {"patched": sorted(sglang_plugin.PATCHED), "processes": 1}


def test_kernels_key_is_semantic_and_detrl_by_default():
    cfg = load_config("gsm8k-smollm2-135m")
    assert cfg.rollout.sglang.kernels == "detrl" and is_semantic("rollout.sglang.kernels")
    other = load_config("gsm8k-smollm2-135m", overrides=["rollout.sglang.kernels=sglang", "train.on_policy=approx"])
    assert other.config_hash() != cfg.config_hash()


def _interpreted(check, monkeypatch):
    """Run `check(det_kernels)` in a fresh process under Triton's interpreter: Triton reads
    TRITON_INTERPRET when its own functions are defined, at its first import, and this process may
    have imported it already."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    child = mp.get_context("spawn").Process(target=_run_interpreted, args=(check,))
    child.start()
    child.join(300)
    assert child.exitcode == 0, f"{check.__name__} failed under the interpreter (its traceback is above)"


def _run_interpreted(check):
    check(importlib.import_module("detrl.rollout.det_kernels"))


def test_add_rms_norm_is_per_row_and_is_rmsnorm_of_the_sum(monkeypatch):
    _interpreted(_check_add_rms_norm, monkeypatch)


def _check_add_rms_norm(det_kernels):
    g = torch.Generator().manual_seed(1)
    hidden = 576  # not a power of two: a masked block
    x = (torch.randn(40, hidden, generator=g) * 3).bfloat16()
    r = (torch.randn(40, hidden, generator=g) * 3).bfloat16()
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16()
    out, res = det_kernels.add_rms_norm(x, r, w, 1e-5)
    for lo, hi in ((0, 1), (3, 10), (17, 40)):
        part = det_kernels.add_rms_norm(x[lo:hi].contiguous(), r[lo:hi].contiguous(), w, 1e-5)
        assert torch.equal(part[0], out[lo:hi]) and torch.equal(part[1], res[lo:hi])
    s = x.float() + r.float()
    # the norm is of the rounded sum (the residual stream a trainer stores), not of the float32 sum
    rounded = res.float()
    want = rounded * torch.rsqrt(rounded.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    # the interpreter rounds to bfloat16 toward zero (a GPU rounds to nearest): within 2 ulp of bfloat16
    assert torch.allclose(out.float(), want, rtol=2**-6, atol=1e-6)
    assert torch.allclose(res.float(), s, rtol=2**-6, atol=0)
    assert out.shape == (40, hidden) and out.dtype == res.dtype == torch.bfloat16
    # the plain norm is the same program without the addition: of the residual stream, the same bits
    plain = det_kernels.rms_norm(res, w, 1e-5)
    assert torch.equal(plain, out)
    assert torch.equal(det_kernels.rms_norm(res[3:10].contiguous(), w, 1e-5), out[3:10])
