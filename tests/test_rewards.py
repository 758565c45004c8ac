"""Your own reward (detrl.rewards) and the generated arith task (detrl.arith): imported and checked before
any work, its identity in the ledger, and a changed reward named first by the verdict."""

import json
import textwrap

import pytest
from conftest import detrl, tiny_run

from detrl import arith, rewards
from detrl.config import ConfigError, load_config
from detrl.data import extract_gold, fetch_dataset, gsm8k_reward


def _module(tmp_path, body: str, name: str = "my_reward.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_a_file_reward_is_loaded_scored_with_meta_and_identified_by_its_source(tmp_path):
    path = _module(
        tmp_path,
        """
        def score(response, answer, meta):
            return float(len(response.split()) == meta.get("want", 2))
        """,
    )
    r = rewards.load(f"{path}:score", _Tok())
    assert r.score([5, 6], "#### 1", {"want": 2}) == 1.0 and r.score([5], "#### 1", {"want": 2}) == 0.0
    assert r.identity()["name"] == f"{path}:score" and len(r.identity()["sha256"]) == 64
    path.write_text(path.read_text() + "\n# changed\n")
    assert rewards.load(f"{path}:score", _Tok()).sha256 != r.sha256  # any change to its code is a new reward


BAD = {
    "no such module": ("no_such_module_xyz:score", "cannot import 'no_such_module_xyz'"),
    "no such function": ("{path}:other", "has no function 'other'"),
    "wrong signature": ("{path}:two_args", "must take (response: str, answer: str, meta: dict)"),
    "non-float return": ("{path}:text", "returned 'yes' (str); it must return a finite float"),
    "nan return": ("{path}:nan", "returned nan"),
    "raises": ("{path}:boom", "raised ZeroDivisionError"),
    "not a spec": ("score", "neither a builtin"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_reward_that_cannot_run_is_refused_with_the_fix(tmp_path, case):
    """Import and signature before any download (`check`); the return type on a probe row (`load`)."""
    path = _module(
        tmp_path,
        """
        def two_args(response, answer):
            return 1.0
        def text(response, answer, meta):
            return "yes"
        def nan(response, answer, meta):
            return float("nan")
        def boom(response, answer, meta):
            return 1 / 0
        """,
    )
    spec, message = BAD[case]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rewards.check(spec.format(path=path))
        rewards.load(spec.format(path=path), _Tok())


@pytest.mark.integration
def test_a_bad_reward_exits_2_before_any_work(tmp_path, cache_dir):
    path = _module(tmp_path, "def score(response, answer):\n    return 1.0\n")
    out = tmp_path / "out"
    r = detrl(*tiny_run(out, cache_dir, f"reward={path}:score"))
    assert r.returncode == 2 and "must take (response: str, answer: str, meta: dict)" in r.stderr, r.stderr[-2000:]
    assert not out.exists()


def test_the_arith_task_is_generated_held_out_and_scored_by_the_gsm8k_reward(tmp_path):
    train, test = arith.rows("train"), arith.rows("test")
    assert train == arith.rows("train") and len(train) == 2000 and len(test) > 150
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for r in train[:50]:
        work, gold = r["answer"].split("\n#### ")
        assert extract_gold(r["answer"]) == gold and eval(work.split("=")[0]) == int(gold)
        assert gsm8k_reward(f"So the answer is {gold}.", r["answer"]) == 1.0
    cfg = load_config("arith-smollm2-135m")
    art = fetch_dataset(cfg.data, tmp_path)
    assert art.rows == 2000 and json.loads(open(art.path).readline())["question"] == train[0]["question"]
    with pytest.raises(ConfigError, match="splits train and test"):
        load_config("arith-smollm2-135m", overrides=["data.split=validation"])


def test_a_custom_reward_and_dataset_fields_run_the_loop_and_the_verdict_names_a_changed_reward(
    tmp_path, artifacts, ray_session
):
    """A user's own task end to end on the CPU: a local JSONL with other field names and no '####', a file
    reward that reads each row's metadata; then the same run with the reward's code edited."""
    from detrl.loop import prepare, run
    from detrl.verify import verify

    data = tmp_path / "task.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Say {k}.", "target": str(k), "level": k % 3}) + "\n" for k in range(16))
    )
    path = _module(
        tmp_path,
        """
        def score(response, answer, meta):
            assert set(meta) >= {"level", "iteration", "sample"}, meta
            return float((len(response) + meta["level"]) % 2)
        """,
    )
    sets = [
        "data.source=local",
        f"data.name={data}",
        "data.question_field=prompt",
        "data.answer_field=target",
        "data.use_chat_template=false",
        f"reward={path}:score",
        "train.steps=1",
    ]
    cfg = load_config("tiny-cpu", overrides=sets)
    arts = prepare(cfg, tmp_path / "cache")
    run(cfg, tmp_path / "a", arts)
    path.write_text(path.read_text().replace("% 2)", "% 2) * 1.0"))
    run(cfg, tmp_path / "b", arts)
    v = verify(str(tmp_path / "a"), str(tmp_path / "b"))
    assert v.artifact_diff and v.artifact_diff[0].startswith("reward.sha256"), v.artifact_diff
    assert v.status == "different_experiments" and "the reward's code differs" in v.likely_cause
