import json

import numpy as np
import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detrl.config import DataConfig
from detrl.data import (
    DataError,
    PromptSet,
    extract_answer,
    extract_gold,
    fetch_dataset,
    gsm8k_reward,
    hash_reward,
    normalize_number,
    read_dataset,
    sample_seed,
)

ROWS = [json.loads(line) for line in (FIXTURES / "gsm8k_rows.jsonl").read_text().splitlines()]


def test_gold_answers_of_real_gsm8k_rows():
    golds = [extract_gold(r["answer"]) for r in ROWS]
    assert all(g is not None for g in golds)
    # the reference answer text itself must earn reward 1 against its own gold
    assert all(gsm8k_reward(r["answer"], r["answer"]) == 1.0 for r in ROWS)
    # and the gold of one row is not the gold of most others
    assert sum(gsm8k_reward(ROWS[0]["answer"], r["answer"]) for r in ROWS) < len(ROWS) / 4


@pytest.mark.parametrize(
    "text,expected",
    [
        ("So she pays $1,234.50 in total.\n#### 1234.5", "1234.5"),
        ("#### $18", "18"),
        ("#### 18.00", "18"),
        ("#### -3", "-3"),
        ("The final answer is \\boxed{1,000}.", "1000"),
        ("\\boxed{\\frac{1}{2}} no wait \\boxed{42}", "42"),
        ("The answer is 7 apples.", "7"),
        ("First 3 then 4 then 12 dollars", "12"),
        ("#### 15 cookies", "15"),
        ("no digits here", None),
    ],
)
def test_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_rewards_against_real_answers():
    row = ROWS[3]
    gold = extract_gold(row["answer"])
    assert gsm8k_reward(f"Let me think. The total is {gold}.\n#### {gold}", row["answer"]) == 1.0
    assert gsm8k_reward(f"\\boxed{{{gold}}}", row["answer"]) == 1.0
    wrong = str(int(float(gold)) + 1)
    assert gsm8k_reward(f"#### {wrong}", row["answer"]) == 0.0
    assert normalize_number("$3,000.0 dollars") == "3000"


def test_hash_reward_is_deterministic_and_not_constant():
    vals = [hash_reward([i, i + 1, i + 2]) for i in range(64)]
    assert vals == [hash_reward([i, i + 1, i + 2]) for i in range(64)]
    assert set(vals) == {0.0, 1.0}


def _tokenizer(artifacts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(artifacts.model.path)


def test_prompt_order_follows_the_seed(artifacts):
    tok = _tokenizer(artifacts)
    rows = read_dataset(artifacts.data)
    cfg = DataConfig(source="builtin", name="gsm8k-sample")
    a, b, c = PromptSet(rows, tok, cfg, 0), PromptSet(rows, tok, cfg, 0), PromptSet(rows, tok, cfg, 1)
    seq = lambda ps: [ps.batch(k, 8).indices for k in range(20)]  # 160 draws: wraps into new epochs
    assert seq(a) == seq(b)
    assert seq(a) != seq(c)
    first_epoch = [i for batch in seq(a)[:8] for i in batch]
    assert sorted(first_epoch) == list(range(64))  # a permutation per epoch


def test_prompts_use_the_chat_template(artifacts):
    tok = _tokenizer(artifacts)
    ps = PromptSet(read_dataset(artifacts.data)[:2], tok, DataConfig(source="builtin", name="gsm8k-sample"), 0)
    text = tok.decode(ps.prompts[0])
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("<|im_start|>assistant")
    assert "####" in text


def test_sample_seeds_are_distinct_per_sample_and_iteration():
    seeds = {sample_seed(7, it, j, 16) for it in range(5) for j in range(16)}
    assert len(seeds) == 80


def test_builtin_and_local_files(tmp_path):
    art = fetch_dataset(DataConfig(source="builtin", name="gsm8k-sample"), tmp_path)
    assert art.rows == 64
    local = tmp_path / "mine.jsonl"
    local.write_text("".join(json.dumps({"q": r["question"], "a": r["answer"]}) + "\n" for r in ROWS))
    art2 = fetch_dataset(DataConfig(source="local", name=str(local), question_field="q", answer_field="a"), tmp_path)
    assert art2.rows == len(ROWS) and read_dataset(art2)[0]["question"] == ROWS[0]["question"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    art3 = fetch_dataset(DataConfig(source="local", name=str(tmp_path / "rows.parquet"), limit=5), tmp_path)
    assert art3.rows == 5


def test_hub_code_path_reads_a_dataset_repo_layout(tmp_path):
    """The hub branch is `datasets.load_dataset(name, subset, split=...)`; a local directory laid out
    like the openai/gsm8k repo (README configs + parquet per config) exercises that same call."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "gsm8k-repo"
    (repo / "main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:30]), repo / "main" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[30:]), repo / "main" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n"
    )
    art = fetch_dataset(DataConfig(source="hub", name=str(repo), subset="main", split="train"), tmp_path / "c")
    assert art.rows == 30
    assert read_dataset(art)[0]["answer"] == ROWS[0]["answer"]


def test_hub_failure_is_clear(tmp_path):
    with pytest.raises(DataError, match="could not load dataset 'nobody/no-such-dataset'.*data.source=local"):
        fetch_dataset(DataConfig(source="hub", name="nobody/no-such-dataset"), tmp_path)


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"question": "q", "solution": "x"}], "lack field"),
        ([{"question": "q", "answer": "no final number"}], "no final '#### <number>'"),
        ([], "no rows"),
    ],
)
def test_bad_datasets_fail_early(tmp_path, rows, match):
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=match):
        fetch_dataset(DataConfig(source="local", name=str(f)), tmp_path)


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        fetch_dataset(DataConfig(source="local", name=str(tmp_path / "nope.jsonl")), tmp_path)


def test_dataset_file_tampering_is_detected(tmp_path):
    art = fetch_dataset(DataConfig(source="builtin", name="gsm8k-sample"), tmp_path)
    with open(art.path, "a") as f:
        f.write("{}\n")
    with pytest.raises(DataError, match="changed"):
        read_dataset(art)


def test_hash_reward_uses_int64_tokens():
    assert hash_reward(np.asarray([1, 2, 3], dtype=np.int32)) == hash_reward([1, 2, 3])


# ---------------------------------------------------------------- the reward on any text


GOLD = "She sold 3 + 4 = 7 apples.\n#### 7"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=3000) | st.text(alphabet="0123456789,.$- #\\boxed{}answeris\n", max_size=3000))
def test_reward_of_any_text_is_zero_or_one(response):
    assert gsm8k_reward(response, GOLD) in (0.0, 1.0)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=-(10**60), max_value=10**60), st.text(max_size=200))
def test_reward_pays_exactly_the_gold_number(n, prefix):
    gold = f"...\n#### {n}"
    assert gsm8k_reward(f"{prefix}\n#### {n}", gold) == 1.0
    assert gsm8k_reward(f"{prefix}\n#### {n + 1}", gold) == 0.0


@pytest.mark.parametrize(
    "response",
    [
        "The answer is " + "9" * 29,  # 29 digits: crashed decimal's 28-digit context
        "#### " + "1234567890" * 10,  # 100 digits after ####
        "1," * 50_000 + "1",  # a temperature-1 run of "1,1,1,..."
        "\\boxed{" + "1," * 20_000 + "}",
        "-" * 100_000 + "7",
        "answer is " * 20_000,
        "$" * 50_000 + "7.000000000000000000000000000000000001",
    ],
)
def test_reward_survives_pathological_model_output(response):
    assert gsm8k_reward(response, GOLD) in (0.0, 1.0)
    assert gsm8k_reward(response, "#### " + "9" * 29) in (0.0, 1.0)


def test_reward_normalization_of_long_and_signed_numbers():
    assert normalize_number("#" + "1," * 40 + "1") == "1" * 41
    assert normalize_number("-0.000") == "0" and normalize_number("-.50") == "-0.5"
    assert normalize_number("007.100") == "7.1"
    assert gsm8k_reward("#### 1,234.00", "#### 1234") == 1.0
    assert gsm8k_reward("#### " + "9" * 29, "#### " + "9" * 29) == 1.0
