"""The tiny-cpu loop through Ray, run twice and verified; then planted divergences, each of which
the verifier must catch at the right iteration, phase and tensor."""

import dataclasses
import shutil
import time
from pathlib import Path

import pytest

from detrl.artifacts import ConversionFailed, Converting
from detrl.config import ConfigError, load_config
from detrl.determinism import DeterminismError
from detrl.ledger import read_ledger
from detrl.loop import run
from detrl.plant import Perturbation
from detrl.report import format_text
from detrl.verify import verify

pytestmark = pytest.mark.integration


def test_two_runs_are_identical_though_run_b_sent_its_requests_differently(runs):
    v = verify(str(runs / "a"), str(runs / "b"))
    assert v.status == "identical" and v.exit_code == 0, v
    assert v.iterations == (3, 3) and v.first is None
    schedule = read_ledger(runs / "b").header["schedule"]
    assert (
        schedule["perturbed"]
        and schedule["submissions"] >= 2
        and not read_ledger(runs / "a").header["schedule"]["perturbed"]
    )
    assert "the engine is batch-invariant here" in format_text(v)


def test_a_batch_variant_engine_passes_one_schedule_and_fails_a_perturbed_run_b(runs, artifacts):
    """The teeth of the perturbed run B: the hf engine's padded batching is batch-variant (the CPU's M=1 and
    M>1 matmuls differ), yet with one schedule its two runs repeat each other bit for bit."""
    from detrl.schedule import for_run

    cfg = load_config(
        "tiny-cpu", overrides=["rollout.hf.batching=padded", "determinism.selftest=false", "train.steps=1"]
    )
    for name, schedule in (("pad_a", for_run(cfg, "A")), ("pad_b", for_run(cfg, "A")), ("pad_b2", for_run(cfg, "B"))):
        run(cfg, runs / name, artifacts, schedule=schedule)
    same = verify(str(runs / "pad_a"), str(runs / "pad_b"))
    assert same.status == "identical" and "not batch invariance" in format_text(same)
    v = verify(str(runs / "pad_a"), str(runs / "pad_b2"))
    assert v.status == "diverged" and v.first.iteration == 0
    assert v.first.phase in ("rollout_tokens", "rollout_logprobs"), v.first
    assert "run B sent its requests differently" in v.likely_cause


def test_weights_change_at_every_step(runs):
    led = read_ledger(runs / "a")
    assert led.complete
    policies = [it["hashes"]["policy_weights"] for it in led.iterations]
    after = [it["hashes"]["weights"] for it in led.iterations]
    assert len(set(policies)) == len(policies) and len(set(after)) == len(after)
    for field in ("policy_weights", "weights"):  # every tensor moved in every step
        per_step = [dict(map(tuple, it["tensors"][field])) for it in led.iterations]
        for prev, cur in zip(per_step, per_step[1:]):
            assert set(prev) == set(cur)
            unchanged = [n for n in cur if cur[n] == prev[n]]
            assert unchanged == [], (field, unchanged)
    assert all(it["stats"]["mean_response_len"] > 0 for it in led.iterations)


def test_ledger_records_every_phase_and_the_environment(runs):
    led = read_ledger(runs / "a")
    assert set(led.iterations[0]["hashes"]) == {
        "policy_weights",
        "prompts",
        "rollout_tokens",
        "rollout_logprobs",
        "rewards",
        "advantages",
        "trainer_logprobs",
        "loss",
        "grad_norm",
        "weights",
    }
    fps = led.header["fingerprints"]
    assert {"driver", "trainer0", "rollout"} <= set(fps)
    assert fps["rollout"]["env"] == {
        "NCCL_ALGO": "Ring",
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }
    assert fps["trainer0"]["deterministic_algorithms"] is True
    assert (runs / "a" / "fingerprint.json").exists() and (runs / "a" / "steps" / "iter_00002.safetensors").exists()
    # where a run's time went: its start-up parts, and per iteration each phase and the tokens trained
    assert {"env_check", "engine_and_trainer", "selftest"} <= set(led.header["startup_s"])
    assert all(v >= 0 for v in led.header["startup_s"].values())
    stats = led.iterations[0]["stats"]
    assert stats["train_tokens"] > 8 * stats["mean_response_len"]  # prompts and responses of 8 samples
    assert stats["step_s"] >= stats["sync_s"] + stats["rollout_s"] + stats["train_s"]
    # the sync's parts, each timed in its own process, fall inside the driver's sync window
    assert 0 < stats["sync_export_s"] <= stats["sync_s"] and 0 < stats["sync_load_s"] <= stats["sync_s"]


def test_a_different_seed_is_caught_at_the_prompts(runs, artifacts):
    run(load_config("tiny-cpu", seed=1), runs / "seed1", artifacts)
    v = verify(str(runs / "a"), str(runs / "seed1"))
    assert v.status == "diverged" and v.exit_code == 1
    assert (v.first.iteration, v.first.phase) == (0, "prompts")
    assert any(d.startswith("seed: 0 -> 1") for d in v.config_diff)
    assert "configured differently" in v.likely_cause


def test_a_different_sampling_seed_is_caught_at_the_rollout(runs, artifacts):
    run(load_config("tiny-cpu", overrides=["rollout.seed=123"]), runs / "rseed", artifacts)
    v = verify(str(runs / "a"), str(runs / "rseed"))
    assert (v.first.iteration, v.first.phase) == (0, "rollout_tokens")
    assert (v.first.sample, v.first.position) == (0, 0)
    ctx = v.first.context  # decoded with the run's own tokenizer, the differing token first
    assert ctx["a"][0] != ctx["b"][0] and len(ctx["a_text"]) == len(ctx["a"]) == 7
    lines = format_text(v).splitlines()
    # the semantic config difference is named before the divergence it explains
    assert lines[1] == "semantic config differences: rollout.seed: None -> 123"
    assert lines[3].startswith("rollout_tokens first differ at sample 0, token position 0")


def test_one_flipped_bit_before_iteration_k_is_caught_at_k_with_its_tensor(runs, tiny_cfg, artifacts):
    run(
        tiny_cfg,
        runs / "flip",
        artifacts,
        perturbations=[Perturbation(iteration=1, tensor="decoder.layers.1.mlp.linear_fc2.weight")],
    )
    v = verify(str(runs / "a"), str(runs / "flip"))
    assert v.status == "diverged"
    assert (v.first.iteration, v.first.phase) == (1, "policy_weights")
    assert v.first.tensors == ["model.layers.1.mlp.down_proj.weight"]
    assert "model.layers.1.mlp.down_proj.weight" in v.likely_cause


def test_a_flip_after_the_optimizer_step_is_caught_in_the_weights(runs, tiny_cfg, artifacts):
    run(
        tiny_cfg,
        runs / "flip_after",
        artifacts,
        perturbations=[
            Perturbation(iteration=2, tensor="decoder.layers.0.self_attention.linear_qkv.bias", when="after_step")
        ],
    )
    v = verify(str(runs / "a"), str(runs / "flip_after"))
    assert (v.first.iteration, v.first.phase) == (2, "weights")
    assert v.first.tensors == ["decoder.layers.0.self_attention.linear_qkv.bias"]


def test_a_truncated_or_unfinished_ledger_is_never_a_match(runs):
    torn = runs / "torn"
    shutil.copytree(runs / "b", torn)
    data = (torn / "ledger.jsonl").read_bytes()
    (torn / "ledger.jsonl").write_bytes(data[: len(data) - 40])  # cut inside the completion record
    v = verify(str(runs / "a"), str(torn))
    assert v.status == "incomplete" and v.exit_code == 2
    assert any("torn" in p for p in v.problems)
    lines = data.splitlines(keepends=True)
    (torn / "ledger.jsonl").write_bytes(b"".join(lines[:-1]))  # whole records, no completion
    v = verify(str(torn), str(runs / "a"))
    assert v.exit_code == 2 and any("no completion record" in p for p in v.problems)
    assert verify(str(runs / "a"), str(runs / "missing")).exit_code == 2


def test_a_worker_missing_a_required_variable_stops_the_run(runs, artifacts):
    cfg = load_config("tiny-cpu", overrides=["resources.worker_env.rollout.NCCL_ALGO=null"])
    with pytest.raises(DeterminismError, match="rollout: NCCL_ALGO is not set"):
        run(cfg, runs / "noenv", artifacts)
    assert not (runs / "noenv" / "ledger.jsonl").exists()


def test_the_self_test_stops_a_batch_variant_engine_before_iteration_0(runs, artifacts):
    """The self-test runs while the trainers set up (queued behind the engine's start, not after the
    trainers): a batch-variant engine still stops the run before iteration 0 is recorded."""
    cfg = load_config("tiny-cpu", overrides=["rollout.hf.batching=padded", "train.steps=1"])
    with pytest.raises(DeterminismError, match="the rollout engine is not batch-invariant"):
        run(cfg, runs / "variant", artifacts)
    assert not (runs / "variant" / "ledger.jsonl").exists()


def test_a_run_directory_is_never_overwritten(runs, tiny_cfg, artifacts):
    with pytest.raises(ConfigError, match="already holds a complete run ledger"):
        run(tiny_cfg, runs / "a", artifacts)


def test_a_run_starts_its_workers_while_its_conversion_runs_and_ends_identical(runs, tiny_cfg, artifacts):
    def conversion():  # the conversion, still running for a while after the run began
        time.sleep(1.5)
        return artifacts.megatron

    pending = dataclasses.replace(artifacts, megatron=Converting(artifacts.megatron.path, conversion))
    run(tiny_cfg, runs / "converting", pending)
    header = read_ledger(runs / "converting" / "ledger.jsonl").header
    # waited for inside the workers' start (after their env check, beside the engine's start), not before it
    assert header["startup_s"]["conversion"] >= 1.4 and "env_check" in header["startup_s"]
    assert header["artifacts"]["megatron"] == dataclasses.asdict(artifacts.megatron)
    assert verify(str(runs / "a"), str(runs / "converting")).status == "identical"
    # this process imported torch._dynamo, so torch wrote its default cache into its environment; the
    # workers still made their inductor cache under det-rl's (torch makes it as they import torch._dynamo)
    assert (Path(artifacts.compile_cache) / "inductor").is_dir()


def test_a_failed_conversion_stops_the_run_with_its_error_and_leaves_nothing(runs, tiny_cfg, artifacts):
    def conversion():
        raise OSError("no space left on device")

    pending = dataclasses.replace(artifacts, megatron=Converting(artifacts.megatron.path, conversion))
    with pytest.raises(ConversionFailed, match="no space left on device"):
        run(tiny_cfg, runs / "unconverted", pending)
    assert not (runs / "unconverted").exists()
