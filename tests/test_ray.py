"""detrl.ray and detrl.weight_sync without starting Ray: the one determinism-env and FA3 rule, the
driver-side preflight that predicts the workers' environment, the fault hooks, the transport choice and
the object_store payload's form.
(The actors themselves run in the integration tier: test_loop, test_ops, test_parallel.)"""

import sys
import time

import pytest

from detrl import doctor, weight_sync
from detrl.config import load_config
from detrl.determinism import DeterminismError
from detrl.ray import env as worker_env
from detrl.ray import faults


def test_the_determinism_rule_names_each_problem_with_its_fix_and_nothing_when_off():
    cfg = load_config("tiny-cpu")
    good = dict(cfg.determinism.env)
    assert worker_env.determinism_problems("rollout", good, None, cfg) == []
    missing = {**good, "NCCL_ALGO": None}
    found = worker_env.determinism_problems("trainer0", missing, "flash_attn_interface", cfg)
    assert [p.check for p in found] == [worker_env.ENV_CHECK, worker_env.FA3_CHECK]
    assert "NCCL_ALGO" in found[0].detail and "worker_env" in found[0].fix
    assert "pip uninstall -y flash_attn_3" in found[1].fix
    with pytest.raises(DeterminismError, match="trainer0: FlashAttention-3 is importable"):
        worker_env.refuse(found)
    off = load_config("tiny-cpu", overrides=["determinism.enabled=false"])
    assert worker_env.determinism_problems("trainer0", {}, "flash_attn_interface", off) == []


def test_the_local_preflight_predicts_the_workers_env_without_starting_ray(monkeypatch):
    from detrl.ray import group, session

    def no_workers(*_, **__):
        raise AssertionError("the local preflight started Ray or workers")

    monkeypatch.setattr(session, "ensure_ray", no_workers)
    monkeypatch.setattr(group.Workers, "__enter__", no_workers)
    report = doctor.run(load_config("tiny-cpu"), in_workers=False)
    assert report.ok, report.table()
    assert {c.where for c in report.checks} == {"driver", "trainer", "rollout"}
    for key in ("CUBLAS_WORKSPACE_CONFIG",):
        monkeypatch.delenv(key, raising=False)
    dropped = load_config("tiny-cpu", overrides=["resources.worker_env.trainer.CUBLAS_WORKSPACE_CONFIG=null"])
    bad = doctor.run(dropped, in_workers=False).failures()
    assert [(c.where, c.name) for c in bad] == [("trainer", "determinism env")]
    assert "CUBLAS_WORKSPACE_CONFIG is not set" in bad[0].detail


def test_the_local_preflight_refuses_an_importable_fa3(tmp_path, monkeypatch):
    (tmp_path / "flash_attn_interface.py").write_text("# a stand-in for FlashAttention-3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = doctor.run(load_config("tiny-cpu"), in_workers=False).failures()
    assert {(c.where, c.name) for c in bad} == {
        ("trainer", "FlashAttention-3 absent"),
        ("rollout", "FlashAttention-3 absent"),
    }
    sys.modules.pop("flash_attn_interface", None)


class _Actor:
    def setup(self) -> str:
        return "started"

    def generate(self) -> str:
        return "tokens"


def test_fault_hooks_wrap_only_the_named_method_and_refuse_an_unknown_one():
    assert faults.inject(_Actor, {}) is _Actor  # production: the class itself, no test code in it
    hooked = faults.inject(_Actor, {faults.HANG_ENV: "generate"})
    assert hooked is not _Actor and issubclass(hooked, _Actor)
    assert hooked.setup is _Actor.setup and hooked.generate is not _Actor.generate
    assert hooked().generate() == "tokens"  # this process's env names no fault: the method runs
    with pytest.raises(ValueError, match="no method"):
        faults.inject(_Actor, {faults.CRASH_ENV: "train_step"})


def test_the_transport_is_chosen_from_the_config_and_unknown_names_are_refused():
    assert weight_sync.transport_for(load_config("tiny-cpu")) == "object_store"
    assert weight_sync.transport_for(load_config("gsm8k-qwen2.5-0.5b-smoke")) == "ipc"
    apart = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=["rollout.sglang.weight_sync=object_store"])
    assert weight_sync.transport_for(apart) == "object_store"
    for name in weight_sync.TRANSPORTS:
        mod = weight_sync.module(name)
        assert callable(mod.export) and callable(mod.load) and callable(mod.release)
    with pytest.raises(ValueError, match="unknown weight-sync transport"):
        weight_sync.module("disk")


def test_object_store_payload_is_every_tensor_bit_for_bit_in_out_of_band_buffers():
    """What Ray does with the payload: pickle 5 with a buffer callback. The tensors' bytes must all leave
    as buffers (written once, mapped in place by the reader) and come back bit for bit, whatever the dtype."""
    import pickle

    import torch

    from detrl.weight_sync import object_store

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=g),
        "b16": torch.randn(7, generator=g).to(torch.bfloat16),
        "h": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "nan": torch.tensor([float("nan"), -0.0, 1e-45]),
    }
    tensors["nan"].view(torch.int32)[0] |= 0x1234  # a NaN payload an equality test of values would miss
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(object_store.pack(tensors), protocol=5, buffer_callback=buffers.append)
    assert sum(b.raw().nbytes for b in buffers) == sum(t.numel() * t.element_size() for t in tensors.values())
    back = object_store.unpack(pickle.loads(data, buffers=buffers))
    assert list(back) == list(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert back[k].reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist(), k


def test_a_process_that_exited_is_not_alive_even_before_it_is_reaped():
    import signal
    import subprocess

    from detrl.ray.group import process_alive

    p = subprocess.Popen(["sleep", "60"])
    try:
        assert process_alive(p.pid)
        p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(p.pid) and time.monotonic() < deadline:  # a zombie until wait() reaps it
            time.sleep(0.05)
        assert not process_alive(p.pid)  # the zombie
        assert p.poll() is not None and not process_alive(p.pid)  # reaped: no /proc entry left
    finally:
        p.kill()
        p.wait()


def test_a_trainer_rank_reaches_the_store_by_loopback_only_on_rank_0s_node():
    import ray

    from detrl.ray.trainer_actor import _store_host

    assert _store_host(ray.util.get_node_ip_address()) == "127.0.0.1"
    assert _store_host("203.0.113.7") == "203.0.113.7"  # another node (TEST-NET-3): its own address
