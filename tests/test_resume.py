"""Resume: a run whose trainer is SIGKILLed mid-run and resumed from its last checkpoint with
`detrl run --resume` writes a ledger identical record for record to one that never stopped.

The layout is the hardest one the CPU can run: 2 data-parallel replicas of 2 tensor-parallel ranks, so
the checkpoint carries per-TP-rank optimizer state and per-replica data shards. The single-rank case
is resumed by a Prefect task retry in test_deployment."""

import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import detrl, tiny_run
from crash import kill_trainer_when
from ray.exceptions import RayError

from detrl.checkpoints import latest_checkpoint
from detrl.cli import main
from detrl.config import ConfigError, load_config
from detrl.ledger import read_ledger
from detrl.loop import run
from detrl.rollout import sglang_plugin
from detrl.verify import verify

pytestmark = pytest.mark.integration
SETS = ["checkpoint.every=1", "train.steps=2", "resources.trainer_ranks=4", "resources.tensor_parallel=2"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, artifacts, cache_dir, ray_session):
    d = tmp_path_factory.mktemp("resume")
    cfg = load_config("tiny-cpu", overrides=SETS)
    run(cfg, d / "straight", artifacts)
    crashed = d / "crashed"
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        # in the last iteration, after the first one's checkpoint
        killed = pool.submit(kill_trainer_when, crashed, "ledger.jsonl", 1, done, checkpointed=True)
        with pytest.raises(RayError):  # the killed trainer's actor died
            run(cfg, crashed, artifacts)
        done.set()
        assert killed.result(), "the trainer was never killed"
    part = read_ledger(crashed)
    # the surviving rollout actor closed before it was killed: its temp folder is gone
    rollout_pid = part.header["placement"]["rollout"]["pid"]
    assert not list(Path(tempfile.gettempdir()).glob(f"{sglang_plugin.PATH_FOLDER_PREFIX}{rollout_pid}-*"))
    assert not part.complete and len(part.iterations) == 1
    ckpt = latest_checkpoint(crashed)
    assert ckpt is not None and ckpt.iteration == 0
    args = tiny_run(crashed, cache_dir, *SETS)
    assert main(args) == 2  # never overwritten without asking; exit 2 (bad input, before any work), not 1
    assert main([*args, "--resume"]) == 0  # in this process: its Ray is the session's
    return {"cfg": cfg, "straight": d / "straight", "crashed": crashed, "checkpoint": ckpt.iteration}


def test_killed_and_resumed_run_equals_an_uninterrupted_one(resumed):
    crashed = resumed["crashed"]
    v = verify(str(resumed["straight"]), str(crashed))
    assert v.status == "identical", (v.first, v.problems)
    lines = [json.loads(x) for x in (crashed / "ledger.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["header", "iteration", "iteration", "complete"]
    resumes = [json.loads(x) for x in (crashed / "resumes.jsonl").read_text().splitlines()]
    assert [r["from_checkpoint"] for r in resumes] == [resumed["checkpoint"]]
    assert len(list((crashed / "checkpoints").glob("iter_*"))) <= 2  # checkpoint.keep
    assert not list(crashed.rglob("*.lock")), list(crashed.rglob("*.lock"))  # no lock file left behind


def test_resume_refuses_another_config_and_a_complete_run_is_left_as_is(resumed, artifacts):
    with pytest.raises(ConfigError, match=r"different config \(seed: 0 -> 5\)"):
        run(load_config("tiny-cpu", overrides=SETS, seed=5), resumed["crashed"], artifacts, resume=True)
    before = (resumed["crashed"] / "ledger.jsonl").read_bytes()
    assert run(resumed["cfg"], resumed["crashed"], artifacts, resume=True).iterations == 2
    assert (resumed["crashed"] / "ledger.jsonl").read_bytes() == before


def _interrupted_copy(src, d, iterations: int, tail: bytes = b""):
    """A copy of a finished run cut back to its header and `iterations` records (plus `tail`, a torn line)."""
    import shutil

    shutil.copytree(src, d)
    lines = (d / "ledger.jsonl").read_bytes().splitlines(keepends=True)
    (d / "ledger.jsonl").write_bytes(b"".join(lines[: 1 + iterations]) + tail)
    return d


def test_a_run_without_checkpoints_resumes_from_its_start_and_keeps_every_record(tmp_path, runs, cache_dir, capsys):
    """No checkpoint.every: the run's start (the converted checkpoint and the seed) is the restart point.
    The recorded iterations are recomputed, proven equal and kept byte for byte; the rest is appended."""
    d = _interrupted_copy(runs / "a", tmp_path / "no-ckpt", 2, tail=b'{"kind":"iteration","iter')
    (d / "checkpoints" / ".iter_00001.half").mkdir(parents=True)  # a save killed half way
    kept = b"".join((d / "ledger.jsonl").read_bytes().splitlines(keepends=True)[:3])
    assert main([*tiny_run(d, cache_dir), "--resume"]) == 0, capsys.readouterr().err[-2000:]
    data = (d / "ledger.jsonl").read_bytes()
    assert data.startswith(kept) and read_ledger(d).complete
    assert (d / "ledger.jsonl.torn").read_bytes() == b'{"kind":"iteration","iter\n'  # the torn line, kept aside
    assert verify(str(runs / "b"), str(d)).status == "identical"
    resumes = [json.loads(x) for x in (d / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["from_checkpoint"] is None and resumes[-1]["recomputes"] == [0, 1]
    assert not (d / "checkpoints" / ".iter_00001.half").exists()


def test_a_resume_that_recomputes_other_bits_is_a_divergence_and_the_ledger_is_untouched(
    tmp_path, runs, cache_dir, capsys
):
    d = _interrupted_copy(runs / "a", tmp_path / "edited", 2)
    lines = (d / "ledger.jsonl").read_text().splitlines(keepends=True)
    rec = json.loads(lines[2])
    rec["hashes"]["loss"] = "0" * 64  # still a valid record: the recomputed one must catch it
    lines[2] = json.dumps(rec) + "\n"
    (d / "ledger.jsonl").write_text("".join(lines))
    before = (d / "ledger.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*tiny_run(d, cache_dir), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "DIVERGED" in err and "recomputed iteration 1" in err and "first in loss" in err, err[-2000:]
    assert (d / "ledger.jsonl").read_bytes() == before
    assert json.loads((d / "resume-divergence-00001.json").read_text())["hashes"]["loss"] != "0" * 64


def test_resume_refuses_another_config(tmp_path, runs, cache_dir):
    d = _interrupted_copy(runs / "a", tmp_path / "other", 2)
    # another config: the message names the semantic keys that changed (checkpoint.every is not one)
    r = detrl(*tiny_run(d, cache_dir, "checkpoint.every=1", "rollout.temperature=0.5"), "--resume")
    assert r.returncode == 2 and "different config (rollout.temperature: 1.0 -> 0.5)" in r.stderr, r.stderr[-2000:]
