"""Resume: a run whose trainer is SIGKILLed mid-run and resumed from its last checkpoint with
`detrl run --resume` writes a ledger identical record for record to one that never stopped.

The layout is the hardest one the CPU can run: 2 data-parallel replicas of 2 tensor-parallel ranks, so
the checkpoint carries per-TP-rank optimizer state and per-replica data shards. The single-rank case
is resumed by a Prefect task retry in test_deployment."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import detrl, tiny_run
from crash import kill_trainer_when
from ray.exceptions import RayError

from detrl.checkpoints import latest_checkpoint
from detrl.config import ConfigError, load_config
from detrl.ledger import read_ledger
from detrl.loop import run
from detrl.verify import verify

pytestmark = pytest.mark.slow
SETS = ["checkpoint.every=1", "train.steps=4", "resources.trainer_ranks=4", "resources.tensor_parallel=2"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, artifacts, cache_dir, ray_session):
    d = tmp_path_factory.mktemp("resume")
    cfg = load_config("tiny-cpu", overrides=SETS)
    run(cfg, d / "straight", artifacts)
    crashed = d / "crashed"
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(kill_trainer_when, crashed, "ledger.jsonl", 2, done)
        with pytest.raises(RayError):  # the killed trainer's actor died
            run(cfg, crashed, artifacts)
        done.set()
        assert killed.result(), "the trainer was never killed"
    part = read_ledger(crashed)
    assert not part.complete and 2 <= len(part.iterations) < 4
    ckpt = latest_checkpoint(crashed)
    assert ckpt is not None and ckpt.iteration >= 0
    args = tiny_run(crashed, cache_dir, *SETS)
    refused = detrl(*args)  # never overwritten without asking; exit 2 (bad input, before any work), not 1
    assert refused.returncode == 2 and "--resume" in refused.stderr, refused.stderr[-3000:]
    cli = detrl(*args, "--resume")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    return {"cfg": cfg, "straight": d / "straight", "crashed": crashed, "checkpoint": ckpt.iteration}


def test_killed_and_resumed_run_equals_an_uninterrupted_one(resumed):
    crashed = resumed["crashed"]
    v = verify(str(resumed["straight"]), str(crashed))
    assert v.status == "identical", (v.first, v.problems)
    lines = [json.loads(x) for x in (crashed / "ledger.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["header", "iteration", "iteration", "iteration", "iteration", "complete"]
    resumes = [json.loads(x) for x in (crashed / "resumes.jsonl").read_text().splitlines()]
    assert [r["from_checkpoint"] for r in resumes] == [resumed["checkpoint"]]
    assert len(list((crashed / "checkpoints").glob("iter_*"))) <= 2  # checkpoint.keep


def test_resume_refuses_another_config_and_a_complete_run_is_left_as_is(resumed, artifacts):
    with pytest.raises(ConfigError, match=r"different config \(seed: 0 -> 5\)"):
        run(load_config("tiny-cpu", overrides=SETS, seed=5), resumed["crashed"], artifacts, resume=True)
    before = (resumed["crashed"] / "ledger.jsonl").read_bytes()
    assert run(resumed["cfg"], resumed["crashed"], artifacts, resume=True).iterations == 4
    assert (resumed["crashed"] / "ledger.jsonl").read_bytes() == before


def test_resume_without_checkpoints_refuses_and_keeps_the_ledger(tmp_path, runs, cache_dir):
    """A run made without checkpoint.every has nothing to continue from: --resume must not delete its
    recorded iterations and start again (it once did), but exit 2 and say how to go on."""
    import shutil

    d = tmp_path / "no-ckpt"
    shutil.copytree(runs / "a", d)
    lines = (d / "ledger.jsonl").read_text().splitlines(keepends=True)
    (d / "ledger.jsonl").write_text("".join(lines[:3]))  # header + 2 iterations: interrupted
    (d / "checkpoints" / ".iter_00001.half").mkdir(parents=True)  # a save killed half way
    before = (d / "ledger.jsonl").read_bytes()
    r = detrl(*tiny_run(d, cache_dir), "--resume")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no checkpoint to resume from" in r.stderr and "checkpoint.every" in r.stderr and "new --out" in r.stderr
    assert (d / "ledger.jsonl").read_bytes() == before and any((d / "steps").iterdir())
    assert not (d / "checkpoints" / ".iter_00001.half").exists()

    # another config: the message names the semantic keys that changed (checkpoint.every is not one)
    r = detrl(*tiny_run(d, cache_dir, "checkpoint.every=1", "rollout.temperature=0.5"), "--resume")
    assert r.returncode == 2 and "different config (rollout.temperature: 1.0 -> 0.5)" in r.stderr, r.stderr[-2000:]
