"""Diagnostics: preflight on every worker, FA3 refusal, the likely cause from fingerprints, golden
ledgers, and the batch-invariance self-test catching a batch-variant engine."""

import json
import shutil

import pytest

from detrl import doctor, golden
from detrl.config import HFEngineConfig, load_config
from detrl.determinism import DeterminismError
from detrl.ledger import PER_TENSOR, combine
from detrl.loop import run
from detrl.verify import verify

pytestmark = pytest.mark.integration


def _checks(report, name):
    return {c.where: c for c in report.checks if c.name == name}


def test_preflight_passes_on_every_worker(ray_session):
    report = doctor.run(load_config("tiny-cpu"))
    assert report.ok, report.table()
    assert {"driver", "trainer0", "rollout"} == {c.where for c in report.checks}
    assert _checks(report, "determinism env")["rollout"].ok


def test_preflight_names_a_missing_env_var_and_its_fix(ray_session):
    report = doctor.run(
        load_config("tiny-cpu", overrides=["resources.worker_env.trainer.CUBLAS_WORKSPACE_CONFIG=null"])
    )
    assert not report.ok
    bad = report.failures()
    assert [(c.where, c.name) for c in bad] == [("trainer0", "determinism env")]
    assert "CUBLAS_WORKSPACE_CONFIG is not set" in bad[0].detail and "runtime_env" in bad[0].fix


def test_a_planted_fa3_module_fails_preflight_and_stops_the_run(ray_session, tmp_path, monkeypatch, artifacts):
    fake = tmp_path / "fake_site"
    fake.mkdir()
    (fake / "flash_attn_interface.py").write_text("# a stand-in for FlashAttention-3\n")
    monkeypatch.setenv("PYTHONPATH", f"{fake}:{__import__('os').environ.get('PYTHONPATH', '')}")
    report = doctor.run(load_config("tiny-cpu"))
    fa3 = _checks(report, "FlashAttention-3 absent")
    assert not fa3["trainer0"].ok and not fa3["rollout"].ok
    assert "pip uninstall -y flash_attn_3" in fa3["rollout"].fix
    with pytest.raises(DeterminismError, match="FlashAttention-3 is importable"):
        run(load_config("tiny-cpu"), tmp_path / "run", artifacts)


def _plant(src, dst, *, iteration, phase, version=None):
    """A copy of a ledger with one phase hash changed, and optionally one library version."""
    shutil.copytree(src, dst)
    lines = (dst / "ledger.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    if version:
        role, pkg, value = version
        header["fingerprints"][role]["versions"][pkg] = value
    rec = json.loads(lines[1 + iteration])
    if phase in PER_TENSOR:  # keep the record valid: a per-tensor hash and its combined hash change together
        rec["tensors"][phase][0][1] = "xxh3_128:" + "0" * 32
        rec["hashes"][phase] = combine(dict(rec["tensors"][phase]))
    else:
        rec["hashes"][phase] = "0" * 64
    lines[0], lines[1 + iteration] = json.dumps(header), json.dumps(rec)
    done = json.loads(lines[-1])
    if phase == "weights" and iteration == len(lines) - 3:
        done["final_weights"] = rec["hashes"]["weights"]
        lines[-1] = json.dumps(done)
    (dst / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    return dst


# DeepGEMM installed on one host only: SGLang's deterministic GEMMs run other kernels there
@pytest.mark.parametrize("pkg,value", [("transformers", "9.9.9"), ("sgl-deep-gemm", "0.1.5.post1")])
def test_a_changed_library_version_is_named_as_the_likely_cause(runs, tmp_path, pkg, value):
    header = json.loads((runs / "a" / "ledger.jsonl").read_text().splitlines()[0])
    assert pkg in header["fingerprints"]["rollout"]["versions"]  # recorded by every run, installed or not
    b = _plant(runs / "b", tmp_path / "b", iteration=1, phase="rollout_logprobs", version=("rollout", pkg, value))
    v = verify(str(runs / "a"), str(b))
    assert (v.first.iteration, v.first.phase) == (1, "rollout_logprobs")
    assert f"rollout.versions.{pkg}" in v.likely_cause and value in v.likely_cause
    assert any(pkg in d for d in v.fingerprint_diff)


def test_golden_ledger_recorded_matched_and_drift_named(runs, tmp_path):
    store = tmp_path / "golden"
    assert golden.check(runs / "a", store).status == "recorded"
    assert golden.check(runs / "b", store).status == "matches"
    drift = _plant(
        runs / "b", tmp_path / "drift", iteration=2, phase="weights", version=("trainer0", "torch", "9.9.9+drift")
    )
    res = golden.check(drift, store)
    assert res.status == "differs" and not res.ok
    assert res.verdict.first.iteration == 2 and res.verdict.first.phase == "weights"
    assert any("trainer0.versions.torch" in c and "9.9.9+drift" in c for c in res.changed_since)
    assert "DIFFERS" in res.text()
    assert golden.check(drift, store, update=True).status == "updated"
    assert golden.check(drift, store).status == "matches"


def test_golden_refuses_an_incomplete_run(runs, tmp_path):
    torn = tmp_path / "torn"
    shutil.copytree(runs / "a", torn)
    data = (torn / "ledger.jsonl").read_bytes()
    (torn / "ledger.jsonl").write_bytes(data[:-30])
    with pytest.raises(ValueError, match="only a complete, valid ledger"):
        golden.check(torn, tmp_path / "store")


def test_selftest_catches_a_batch_variant_engine(artifacts):
    from detrl.rollout.hf import HFEngine
    from detrl.selftest import batch_invariance

    good = batch_invariance(HFEngine(artifacts.model.path, HFEngineConfig()))
    assert good.passed and good.unique == {"single": 1, "mixed": 1, "prefix": 1}
    bad = batch_invariance(HFEngine(artifacts.model.path, HFEngineConfig(batching="padded")))
    assert not bad.passed and bad.unique["single"] > 1
    assert any("Unique samples" in line and "FAIL" in line for line in bad.lines())


def test_workers_keep_their_jit_caches_under_the_detrl_cache(tmp_path, monkeypatch):
    import torch._dynamo  # noqa: F401  (as the driver does through transformers: torch sets its default cache)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from detrl.loop import compile_cache_dir
    from detrl.ray.env import COMPILE_CACHE_ENV, runtime_env

    cfg = load_config("tiny-cpu")
    cc = compile_cache_dir(tmp_path)
    for key in COMPILE_CACHE_ENV:
        monkeypatch.delenv(key, raising=False)
    env = runtime_env(cfg, "rollout", cc)["env_vars"]
    assert env["TRITON_CACHE_DIR"] == f"{tmp_path}/compile/triton"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == f"{tmp_path}/compile/inductor"
    assert env["FLASHINFER_WORKSPACE_BASE"] == f"{tmp_path}/compile/flashinfer"
    # SGLang replaces DG_JIT_CACHE_DIR with SGLANG_DG_CACHE_DIR: both must point at one folder
    assert env["SGLANG_DG_CACHE_DIR"] == env["DG_JIT_CACHE_DIR"] == f"{tmp_path}/compile/deep_gemm"
    # tvm-ffi (flashinfer's FFI) JIT-builds its torch DLPack addon on import, by default in ~/.cache/tvm-ffi
    assert env["TVM_FFI_CACHE_DIR"] == f"{tmp_path}/compile/tvm-ffi"
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")  # a user's own setting wins
    assert runtime_env(cfg, "trainer", cc)["env_vars"]["TRITON_CACHE_DIR"] == "/elsewhere"
    monkeypatch.setenv("SGLANG_DG_CACHE_DIR", "/dg")
    assert runtime_env(cfg, "rollout", cc)["env_vars"]["SGLANG_DG_CACHE_DIR"] == "/dg"
    monkeypatch.setenv("TVM_FFI_CACHE_DIR", "/ffi")
    assert runtime_env(cfg, "rollout", cc)["env_vars"]["TVM_FFI_CACHE_DIR"] == "/ffi"
    # the value torch writes into the driver's environment is its default, not a user's choice
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert runtime_env(cfg, "trainer", cc)["env_vars"]["TORCHINDUCTOR_CACHE_DIR"] == f"{tmp_path}/compile/inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine")
    assert runtime_env(cfg, "trainer", cc)["env_vars"]["TORCHINDUCTOR_CACHE_DIR"] == "/mine"
