"""Run B's schedule (detrl.schedule): the same requests, sent in another order and other batches."""

import pytest

from detrl.config import ConfigError, load_config, sglang_prefill_tile
from detrl.schedule import PLAIN, Schedule, describe_record, for_run, perturbed


def test_outputs_come_back_in_the_requests_order_whatever_the_submissions():
    sent = []

    def send(prompts, seeds):
        sent.append((list(prompts), seeds))
        return [f"out-{p}-{s}" for p, s in zip(prompts, seeds or [None] * len(prompts))]

    prompts, seeds = list(range(10)), [100 + i for i in range(10)]
    out = Schedule(seed=3, submissions=3).generate(send, prompts, seeds, iteration=0)
    assert out == [f"out-{i}-{100 + i}" for i in range(10)]
    assert len(sent) == 3 and sorted(p for part, _ in sent for p in part) == prompts
    assert [p for part, _ in sent for p in part] != prompts  # shuffled
    assert PLAIN.generate(send, prompts, None, 0) == [f"out-{i}-None" for i in range(10)] and sent[-1][0] == prompts


def test_the_order_is_a_permutation_that_changes_with_the_iteration_and_repeats_with_the_seed():
    s = Schedule(seed=5, submissions=2)
    assert sorted(s.order(0, 64)) == list(range(64))
    assert s.order(0, 64) == Schedule(seed=5).order(0, 64) != s.order(1, 64)
    assert PLAIN.order(0, 5) == [0, 1, 2, 3, 4] and not PLAIN.perturbed


def test_an_engine_answering_fewer_requests_is_an_error():
    with pytest.raises(RuntimeError, match="answered 1 of"):
        Schedule(submissions=1).generate(lambda p, s: p[:1], [1, 2], None, 0)


def test_run_b_is_perturbed_from_the_seed_and_run_a_never():
    cfg = load_config("tiny-cpu")
    b = for_run(cfg, "B")
    assert b.perturbed and b.submissions >= 2 and b.engine_args == {}  # the hf engine has no batch limits
    assert for_run(cfg, "A") == PLAIN
    assert perturbed(cfg) == b and perturbed(load_config("tiny-cpu", seed=1)).seed != b.seed
    assert for_run(load_config("tiny-cpu", overrides=["verify.perturb_schedule=false"]), "B") == PLAIN


def test_on_sglang_run_b_changes_the_engines_batch_limits_away_from_run_as():
    cfg = load_config("gsm8k-smollm2-135m")
    b = perturbed(cfg)
    args = b.engine_args
    assert set(args) == {"max_running_requests", "cuda_graph_max_bs_decode", "chunked_prefill_size"}
    # one submission (a second would wait for the first's longest response), of which the running-request
    # limit queues a quarter or more: the batches still form and shrink unlike run A's
    n = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    assert b.submissions == 1 and b.seed is not None and args["max_running_requests"] <= 3 * n // 4
    for seed in range(8):
        pinned = load_config(
            "gsm8k-smollm2-135m",
            seed=seed,
            overrides=["rollout.sglang.cuda_graph_max_bs=16", "rollout.sglang.chunked_prefill_size=4096"],
        )
        got = perturbed(pinned).engine_args
        assert got["cuda_graph_max_bs_decode"] != 16 and got["chunked_prefill_size"] != 4096
        # no decode batch of run B runs eagerly: the graphs cover every batch it can form
        assert got["cuda_graph_max_bs_decode"] >= got["max_running_requests"]
        running = load_config("gsm8k-smollm2-135m", seed=seed, overrides=["rollout.sglang.max_running_requests=96"])
        assert perturbed(running).engine_args["max_running_requests"] != 96


def test_run_bs_prefill_chunk_is_never_below_sglangs_deterministic_tile(monkeypatch):
    """SGLang's deterministic prefill cuts chunks only at multiples of its split tile: a smaller chunk never
    schedules a longer request (exact mode's scoring of prompt + response hung so on an H200)."""
    for backend in ("flashinfer", "triton"):
        tile = sglang_prefill_tile(backend)
        for seed in range(16):
            cfg = load_config(
                "gsm8k-smollm2-135m",
                seed=seed,
                overrides=[f"rollout.sglang.attention_backend={backend}", "train.on_policy=approx"],
            )
            chunk = perturbed(cfg).engine_args["chunked_prefill_size"]
            assert tile and chunk >= tile and chunk % tile == 0
    monkeypatch.setenv("SGLANG_FLASHINFER_PREFILL_SPLIT_TILE_SIZE", "2048")
    assert perturbed(load_config("gsm8k-smollm2-135m")).engine_args["chunked_prefill_size"] in (2048, 6144)


def test_a_prefill_chunk_below_the_tile_is_refused_with_determinism_on():
    with pytest.raises(ConfigError, match="chunked_prefill_size=512 is below the 4096-token tile.*never be scheduled"):
        load_config("gsm8k-smollm2-135m", overrides=["rollout.sglang.chunked_prefill_size=512"])
    off = ["rollout.sglang.chunked_prefill_size=512", "determinism.enabled=false", "train.on_policy=approx"]
    assert load_config("gsm8k-smollm2-135m", overrides=off).rollout.sglang.chunked_prefill_size == 512
    assert load_config("tiny-cpu", overrides=["rollout.sglang.chunked_prefill_size=512"])  # no SGLang engine


def test_a_recorded_schedule_reads_back_in_words():
    s = Schedule(seed=9, submissions=2, engine_args={"max_running_requests": 4})
    assert describe_record(s.record()) == s.describe()
    assert describe_record(None) == "not recorded (as given)"
    assert describe_record({"submissions": "x"}).startswith("unreadable")
