"""Resume: a run whose trainer worker is killed mid-run, resumed from its last checkpoint, writes a
ledger identical record for record to one that never stopped."""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from detrl.config import load_config
from detrl.ledger import read_ledger
from detrl.loop import RunError, latest_checkpoint, run
from detrl.verify import verify

pytestmark = pytest.mark.slow
CKPT = ["checkpoint.every=1", "train.steps=4"]


def _kill_trainer_when(ledger, iterations, done):
    """SIGKILL the trainer actor's process once the ledger holds `iterations` iteration records."""
    while not done.is_set():
        if ledger.exists() and ledger.read_text().count('"kind":"iteration"') >= iterations:
            for p in psutil.process_iter(["cmdline"]):
                if any("TrainerWorker" in part for part in (p.info["cmdline"] or [])):
                    os.kill(p.pid, signal.SIGKILL)
                    return
        time.sleep(0.05)


@pytest.mark.parametrize("ranks,tp", [(1, 1), (4, 2)], ids=["one-rank", "dp2xtp2"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, artifacts, ray_session, ranks, tp):
    cfg = load_config("tiny-cpu", overrides=[*CKPT, f"resources.trainer_ranks={ranks}", f"resources.tensor_parallel={tp}"])
    run(cfg, tmp_path / "straight", artifacts)
    crashed = tmp_path / "crashed"
    done = threading.Event()
    killer = threading.Thread(target=_kill_trainer_when, args=(crashed / "ledger.jsonl", 2, done), daemon=True)
    killer.start()
    with pytest.raises(Exception):
        run(cfg, crashed, artifacts)
    done.set()
    part = read_ledger(crashed)
    assert not part.complete and 2 <= len(part.iterations) < 4
    ckpt = latest_checkpoint(crashed)
    assert ckpt is not None and ckpt.iteration >= 0
    with pytest.raises(RunError, match="--resume"):
        run(cfg, crashed, artifacts)  # never overwritten without asking
    run(cfg, crashed, artifacts, resume=True)
    v = verify(str(tmp_path / "straight"), str(crashed))
    assert v.status == "identical", (v.first, v.problems)
    lines = [json.loads(x) for x in (crashed / "ledger.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["header", "iteration", "iteration", "iteration", "iteration", "complete"]
    assert json.loads((crashed / "resumes.jsonl").read_text().splitlines()[0])["from_checkpoint"] == ckpt.iteration
    assert len(list((crashed / "checkpoints").glob("iter_*"))) <= 2  # checkpoint.keep


def test_resume_refuses_another_config(tmp_path, artifacts, ray_session):
    cfg = load_config("tiny-cpu", overrides=CKPT)
    run(cfg, tmp_path / "r", artifacts)
    with pytest.raises(RunError, match="different config"):
        run(load_config("tiny-cpu", overrides=CKPT, seed=5), tmp_path / "r", artifacts, resume=True)
    # a complete run resumed is a no-op that reports it
    assert run(cfg, tmp_path / "r", artifacts, resume=True).iterations == 4
