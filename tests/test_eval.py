"""The held-out eval (eval.every): greedy decoding of rows held out of training, through the run's engine and
schedule, its tokens hashed into the ledger and compared by the verdict, its accuracy in the stats."""

import json
import shutil

import pytest
import torch

from detrl.config import load_config
from detrl.ledger import read_ledger
from detrl.rollout.hf import sample_token
from detrl.schedule import for_run
from detrl.verify import verify

pytestmark = pytest.mark.integration
SETS = ["eval.every=2", "eval.prompts=6", "eval.max_new_tokens=6", "checkpoint.every=1"]


def test_temperature_zero_is_greedy_whatever_the_seed():
    logits = torch.tensor([0.1, 2.0, -1.0, 2.0])
    assert len({sample_token(logits, seed, 3, 0.0, 1.0) for seed in range(20)}) == 1
    token, lp = sample_token(logits, 0, 3, 0.0, 1.0)
    assert token == 1 and lp == float(torch.log_softmax(logits, -1)[1])  # the first of two maxima


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, artifacts, ray_session):
    from detrl.loop import run

    d = tmp_path_factory.mktemp("eval")
    cfg = load_config("tiny-cpu", overrides=SETS)
    run(cfg, d / "a", artifacts)
    run(cfg, d / "b", artifacts, schedule=for_run(cfg, "B"))
    return d, cfg


def test_the_eval_runs_at_every_kth_and_the_last_iteration_and_reproduces(evaluated):
    d, cfg = evaluated
    led = read_ledger(d / "a")
    assert [("eval" in it) for it in led.iterations] == [True, False, True]
    ev = led.iterations[0]["eval"]
    assert ev["prompts"] == 6 and 0.0 <= ev["accuracy"] <= 1.0
    assert led.iterations[2]["stats"]["eval_accuracy"] == led.iterations[2]["eval"]["accuracy"]
    v = verify(str(d / "a"), str(d / "b"))  # run B's eval was scheduled differently too
    assert v.status == "identical" and v.table[0]["eval"] == "match", v


def test_held_out_rows_are_never_trained_on(evaluated, artifacts):
    from transformers import AutoTokenizer

    from detrl.data import PromptSet, format_prompt, read_dataset

    _, cfg = evaluated
    rows = read_dataset(artifacts.data)
    tok = AutoTokenizer.from_pretrained(artifacts.model.path)
    held = {tuple(format_prompt(tok, r["question"], cfg.data)) for r in rows[-6:]}
    train = PromptSet(rows[:-6], tok, cfg.data, cfg.seed)
    seen = {tuple(p) for k in range(20) for p in train.batch(k, cfg.rollout.prompts_per_step).prompt_ids}
    assert seen and not seen & held


def test_an_eval_that_differs_is_named_as_the_first_divergence(evaluated, tmp_path):
    d, _ = evaluated
    other = tmp_path / "b"
    shutil.copytree(d / "b", other)
    lines = (other / "ledger.jsonl").read_text().splitlines()
    rec = json.loads(lines[3])
    rec["eval"]["tokens"] = "0" * 64
    lines[3] = json.dumps(rec)
    (other / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    v = verify(str(d / "a"), str(other))
    assert v.status == "diverged" and (v.first.iteration, v.first.phase) == (2, "eval"), v.first
    assert "greedy answers to the held-out prompts differ" in v.likely_cause


def test_holding_out_every_row_is_refused(artifacts, tmp_path):
    from detrl.data import DataError
    from detrl.loop import Step

    cfg = load_config("tiny-cpu", overrides=["eval.every=1", "eval.prompts=64"])
    with pytest.raises(DataError, match="lower eval.prompts"):
        Step(cfg, artifacts, [])


def test_detrl_eval_of_a_checkpoint_equals_the_runs_own_eval(evaluated, cache_dir, capsys):
    """The checkpoint after iteration 1 holds the policy entering iteration 2; the run evaluated iteration 2,
    so `detrl eval` must reproduce that eval's tokens (exit 0), and says so."""
    from detrl.cli import main

    d, _ = evaluated
    capsys.readouterr()
    assert main(["eval", str(d / "a"), "--checkpoint", "1", "--cache", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    recorded = read_ledger(d / "a").iterations[2]["eval"]["accuracy"]
    assert "entering iteration 2" in out and f"equals the run's own eval of it (accuracy {recorded:.4f})" in out
    assert main(["eval", str(d / "a"), "--checkpoint", "7", "--cache", str(cache_dir)]) == 2
    assert "no checkpoint after iteration 7" in capsys.readouterr().err
