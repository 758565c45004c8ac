"""detrl.rollout.sglang_ahead on the CPU: a process started ahead imports its module before the launch,
takes the work the launch hands it with the launch's environment, and is refused (the launch then
starts a fresh process, as SGLang does) where it could not run the work as a fresh process would. This
module stands in for SGLang's engine module: `launch` starts a process the way SGLang launches its
scheduler (`mp.Process(target=..., args=(..., writer))`, then `start()`). On the GPU, tests/test_gpu.py
proves the hand-over inside SGLang."""

import multiprocessing as mp  # the name `Ahead.serving` swaps, as in sglang.srt.entrypoints.engine
import os
import sys
import time

import pytest

from detrl.rollout.sglang_ahead import Ahead

IMPORTED_AT = time.time()
THIS = sys.modules[__name__]


def work(writer, value):
    env = os.environ.get("DETRL_AHEAD_TEST")
    writer.send({"pid": os.getpid(), "value": value, "env": env, "imported": IMPORTED_AT})


def launch(value):
    reader, writer = mp.Pipe(duplex=False)
    proc = mp.Process(target=work, args=(writer, value))
    proc.start()
    return proc, reader


@pytest.fixture(autouse=True)
def spawn_by_default():
    """SGLang's launch makes spawn the default start method before it starts its processes."""
    before = mp.get_start_method(allow_none=True)
    mp.set_start_method("spawn", force=True)
    yield
    mp.set_start_method(before, force=True)


def _ahead(count=1):
    ahead = Ahead((__name__,) * count, env={})
    for s in ahead.started:
        s.ready()  # the import is done before the launch, so the test can tell
    return ahead


def _launch_served(ahead, value):
    """`launch(value)` while `ahead` serves this module: the process, what its work sent, and when the
    launch began."""
    launched_at = time.time()
    try:
        with ahead.serving(THIS):
            proc, reader = launch(value)
        got = reader.recv()
    finally:
        ahead.close()
    return proc, got, launched_at


def test_the_process_started_ahead_runs_the_launched_work_with_the_launchs_environment(monkeypatch):
    ahead = _ahead()
    started = ahead.started[0].proc.pid
    monkeypatch.setenv("DETRL_AHEAD_TEST", "set after the process started")
    proc, got, launched_at = _launch_served(ahead, 7)
    assert got["pid"] == started == proc.pid
    assert got["imported"] < launched_at  # the module was imported ahead, not after the launch
    assert got["value"] == 7
    assert got["env"] == "set after the process started"
    assert ahead.report() == [
        {"module": __name__, "pid": started, "import_s": ahead.started[0].state["import_s"], "refused": None}
    ]
    proc.join(timeout=30)
    assert proc.exitcode == 0
    assert THIS.mp is mp  # the swap ends with the block


def test_an_environment_read_at_process_start_refuses_the_process_and_a_fresh_one_runs_the_work(monkeypatch):
    ahead = _ahead()
    started = ahead.started[0].proc
    monkeypatch.setenv("PYTHONDETRLAHEADTEST", "1")
    monkeypatch.setenv("DETRL_AHEAD_TEST", "fresh")
    proc, got, launched_at = _launch_served(ahead, 8)
    assert got["pid"] == proc.pid != started.pid
    assert got["imported"] > launched_at  # a fresh process imported the module after the launch
    assert got["value"] == 8 and got["env"] == "fresh"
    assert "PYTHONDETRLAHEADTEST" in ahead.report()[0]["refused"]
    started.join(timeout=30)
    assert not started.is_alive()
    proc.join(timeout=30)
    assert proc.exitcode == 0


def test_a_process_no_launch_takes_is_stopped_and_other_targets_start_fresh():
    ahead = _ahead(count=2)
    first, second = (s.proc for s in ahead.started)
    try:
        with ahead.serving(THIS):
            proc, reader = launch(9)
            other = mp.Process(target=print, args=("not a target started ahead",))
            assert other.__class__.__module__ == "multiprocessing.context"
        assert reader.recv()["pid"] == first.pid
    finally:
        ahead.close()
    second.join(timeout=30)
    assert not second.is_alive()
    proc.join(timeout=30)
    assert [r["refused"] for r in ahead.report()] == [None]


def test_import_engine_starts_this_processs_import_of_sglang_and_the_engine_waits_for_it(monkeypatch):
    """`prepare` starts the processes only; `import_engine` starts the engine process's own import of
    SGLang in a thread (here it fails: no SGLang on the CPU), which the engine joins before it imports
    SGLang itself. Off with start_ahead=false."""
    from detrl.config import SGLangConfig
    from detrl.rollout import sglang_ahead, sglang_plugin

    for key in (sglang_plugin.ENABLE_ENV, sglang_plugin.REPORT_ENV):
        monkeypatch.delenv(key, raising=False)  # prepare sets what the engine's processes read: restored after
    start = sglang_ahead.prepare(SGLangConfig(kernels="sglang"), deterministic=False)
    try:
        assert start.ahead is not None and start.importing is None
        start.import_engine()
        assert start.importing is not None and start.importing.name == "detrl-import-sglang"
        start.imported()
        assert start.importing is None
    finally:
        start.abandon()
    assert not start.reports.exists()  # only an engine's start reads it; an abandoned start leaves none
    off = sglang_ahead.prepare(SGLangConfig(kernels="sglang", start_ahead=False), deterministic=False)
    off.import_engine()
    assert off.importing is None and off.ahead is None
    off.abandon()


def test_the_rollout_actor_reaches_prepare_without_importing_torch():
    """The rollout actor's module, its construction and what `prepare` imports leave torch unimported, so
    SGLang's processes start (and begin their own imports) before the actor spends seconds on torch."""
    import subprocess

    code = (
        "import sys\n"
        "from detrl.config import load_config\n"
        "from detrl.ray.rollout_actor import RolloutActor\n"
        "from detrl.rollout import prepare_engine, sglang_ahead, sglang_plugin\n"
        "cfg = load_config('tiny-cpu')\n"
        "RolloutActor(cfg.model_dump_json(), '/nonexistent')\n"
        "print(sorted(m for m in ('torch', 'numpy', 'megatron', 'transformers', 'sglang') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split("\n")[-2] == "[]", out.stdout


def test_the_rollout_actors_checks_import_nothing_beside_its_import_of_sglang():
    """After `prepare`, the actor's checks (run while its own import of SGLang runs in a thread) import no
    module: two threads importing one module graph at once can fail (a run on the GPU failed with
    torch._inductor half-initialised, imported by both `torch.use_deterministic_algorithms` and SGLang).
    Without `import_own_work` the checks import hundreds. A fresh process, as the actor's is."""
    import subprocess

    code = (
        "import importlib, sys\n"
        "from detrl.config import load_config\n"
        "from detrl.ray.rollout_actor import RolloutActor\n"
        "actor = RolloutActor(load_config('tiny-cpu').model_dump_json(), '/nonexistent')\n"
        "actor.prepare()\n"
        "before = set(sys.modules)\n"
        # the driver's check function arrives pickled: its module is imported as it arrives
        "checks = actor.check(lambda role, c: importlib.import_module('detrl.doctor').worker_checks(role, c))\n"
        "print(len(checks), sorted(set(sys.modules) - before))\n"
        "actor.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    n, new = out.stdout.strip().split("\n")[-1].split(" ", 1)
    assert int(n) >= 3 and new == "[]", out.stdout
