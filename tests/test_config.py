import os

import pytest

from detrl.config import PROFILES, ConfigError, load_config


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_validates(name):
    cfg = load_config(name)
    assert cfg.profile == name
    assert cfg.rollout.samples_per_prompt >= 2


def test_reference_profile_mirrors_the_miles_recipe():
    cfg = load_config("gsm8k-qwen2.5-0.5b")
    assert cfg.model.name == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.data.name == "openai/gsm8k"
    assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt) == (32, 8)
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.max_new_tokens == 1024
    assert (cfg.train.eps_clip_low, cfg.train.eps_clip_high, cfg.train.lr) == (0.2, 0.28, 1e-6)
    assert cfg.backends.rollout == "sglang" and cfg.determinism.enabled
    assert cfg.determinism.env == {
        "NCCL_ALGO": "Ring",
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.temprature'.*'rollout.temperature'"):
        load_config("tiny-cpu", overrides=["rollout.temprature=0.5"])


def test_unknown_top_level_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config("tiny-cpu", config_file=f)


@pytest.mark.parametrize(
    "override,where",
    [
        ("rollout.temperature=-1", "rollout.temperature"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),
        ("train.steps=0", "train.steps"),
        ("train.lr=abc", "train.lr"),
        ("backends.rollout=vllm", "backends.rollout"),
    ],
)
def test_out_of_range_values_are_rejected_with_the_key(override, where):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-cpu", overrides=[override])
    assert where in str(err.value)


def test_gpu_backend_without_gpus_is_rejected_with_the_fix():
    with pytest.raises(ConfigError, match="backends.rollout=hf"):
        load_config("gsm8k-qwen2.5-0.5b", overrides=["resources.num_gpus=0"])


def test_overrides_apply_typed_values_and_seed():
    cfg = load_config(
        "tiny-cpu", overrides=["train.lr=1e-5", "rollout.max_new_tokens=7", "determinism.env.NCCL_DEBUG=1"], seed=9
    )
    assert cfg.train.lr == 1e-5 and cfg.rollout.max_new_tokens == 7 and cfg.seed == 9
    assert cfg.determinism.env["NCCL_DEBUG"] == "1"


def test_config_hash_tracks_semantics_not_labels():
    a = load_config("tiny-cpu")
    assert a.config_hash() == load_config("tiny-cpu", overrides=["resources.ray_address=auto"]).config_hash()
    assert a.config_hash() != load_config("tiny-cpu", seed=1).config_hash()


def test_ray_address_comes_from_the_config_else_ray_address_env_else_a_fresh_local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert load_config("tiny-cpu").resources.ray_address is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert load_config("tiny-cpu").resources.ray_address == "10.0.0.1:6379"
    assert (
        load_config("tiny-cpu", overrides=["resources.ray_address=10.0.0.2:6379"]).resources.ray_address
        == "10.0.0.2:6379"
    )


def test_bad_override_syntax_and_unknown_profile():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny-cpu", overrides=["rollout.temperature"])
    with pytest.raises(ConfigError, match="did you mean 'tiny-cpu'"):
        load_config("tiny-cpuu")


def test_runs_a_and_b_go_side_by_side_only_where_both_fit():
    from detrl.twice import choose

    gpu = load_config("gsm8k-qwen2.5-0.5b-smoke")
    assert choose(gpu, gpus=2)[0] == "side_by_side"
    assert choose(gpu, gpus=1)[0] == "sequential"
    two_ranks = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=["resources.num_gpus=2", "resources.trainer_ranks=2"])
    assert choose(two_ranks, gpus=3)[0] == "sequential" and choose(two_ranks, gpus=4)[0] == "side_by_side"
    forced = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=["resources.twice=side_by_side"])
    assert choose(forced, gpus=1)[0] == "shared_gpu"  # too few GPUs for one each: half of one each
    with pytest.raises(ConfigError, match="needs 2 GPUs .* this machine has 0; use resources.twice=sequential"):
        choose(forced, gpus=0)
    forced_two = two_ranks.model_copy(deep=True)
    forced_two.resources.twice = "side_by_side"
    with pytest.raises(ConfigError, match="needs 4 GPUs .* has 3 .*one GPU per run"):
        choose(forced_two, gpus=3)

    cores = os.cpu_count() or 1
    assert choose(load_config("tiny-cpu"))[0] == ("side_by_side" if cores >= 2 else "sequential")
    busy = load_config("tiny-cpu", overrides=[f"resources.cpu_threads={cores}"])
    assert choose(busy)[0] == "sequential"
    assert choose(load_config("tiny-cpu", overrides=["resources.twice=side_by_side"]))[0] == "side_by_side"
    cluster = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=["resources.ray_address=10.0.0.1:6379"])
    assert choose(cluster, gpus=0)[0] == "sequential"
    # the schedule is not part of what a run computes: the config hash ignores it
    assert forced.config_hash() == gpu.config_hash()


def test_both_runs_of_a_pair_hold_one_ray_in_either_mode():
    """The pair's Ray is started once, around both runs, one after the other or side by side."""
    import contextlib

    from detrl.twice import run_both

    events: list[str] = []

    @contextlib.contextmanager
    def hold():
        events.append("start")
        yield
        events.append("stop")

    for mode in ("sequential", "side_by_side"):
        events.clear()
        assert run_both(lambda: events.append("a") or 1, lambda: events.append("b") or 2, mode, hold()) == (1, 2)
        assert events[0] == "start" and events[-1] == "stop" and sorted(events[1:-1]) == ["a", "b"], (mode, events)


def test_one_gpu_is_shared_by_both_runs_only_when_its_memory_holds_them(tmp_path):
    import json

    from detrl.twice import choose, cpu_run_memory_gib, run_config, run_memory_gib

    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "num_hidden_layers": 24,
                "hidden_size": 896,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "intermediate_size": 4864,
                "vocab_size": 151936,
                "tie_word_embeddings": True,
            }
        )
    )
    cfg = load_config("gsm8k-qwen2.5-0.5b-smoke")
    est = run_memory_gib(cfg, qwen)
    assert 30 < est < 80  # weights + Adam (9 GiB), logits and attention of a micro-batch, the KV cache
    assert choose(cfg, gpus=1)[0] == "sequential"  # no model to size: one at a time
    mode, why = choose(cfg, gpus=1, model_dir=qwen, gpu_gib=2.5 * est)
    assert mode == "shared_gpu" and "holds both runs" in why
    assert choose(cfg, gpus=1, model_dir=qwen, gpu_gib=1.5 * est)[0] == "sequential"
    assert choose(cfg, gpus=2, model_dir=qwen, gpu_gib=1.5 * est)[0] == "side_by_side"
    longer = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=["train.micro_batch_tokens=32768"])
    assert run_memory_gib(longer, qwen) > est
    # on the CPU, both runs at once only while the memory free now holds them
    cpu = load_config("smollm2-cpu", overrides=["resources.cpu_threads=1"])
    host = cpu_run_memory_gib(cpu, qwen)
    assert 4 < host < 40  # four 0.5B fp32 copies (weights, gradients, Adam), the engine's, the imports
    mode, why = choose(cpu, model_dir=qwen, host_gib=1.9 * host)
    assert mode == "sequential" and "GiB of memory free: one run at a time" in why
    both = "side_by_side" if (os.cpu_count() or 1) >= 2 else "sequential"
    assert choose(cpu, model_dir=qwen, host_gib=2.1 * host)[0] == both
    local = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=["train.attention=local"])
    assert run_memory_gib(local, qwen) > est + 5  # its s x s scores and probabilities, 24 layers of them
    shared = run_config(cfg, "shared_gpu")
    assert shared.resources.gpu_share == 0.5 and cfg.resources.gpu_share == 1.0
    assert shared.config_hash() == cfg.config_hash()  # the same experiment
    assert run_config(cfg, "side_by_side") is cfg
    # the engine's KV cache holds every sample of a step at its longest
    from detrl.rollout import step_kv_tokens

    assert step_kv_tokens(cfg) >= 32 * 8 * (cfg.data.max_prompt_tokens + 1024)
    with pytest.raises(ConfigError, match="gpu_share=0.5 .* needs one GPU per run"):
        load_config("tiny-cpu", overrides=["resources.gpu_share=0.5"])
    with pytest.raises(ConfigError, match="gpu_share=0.5 .* needs one GPU per run"):
        load_config(
            "gsm8k-qwen2.5-0.5b-smoke",
            overrides=["resources.gpu_share=0.5", "resources.num_gpus=2", "resources.trainer_ranks=2"],
        )


def test_weights_travel_by_cuda_ipc_only_where_trainer_and_engine_share_a_gpu():
    assert load_config("gsm8k-qwen2.5-0.5b-smoke").ipc_weight_sync
    apart = ["resources.num_gpus=2", "resources.colocate=false"]
    assert not load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=apart).ipc_weight_sync
    assert not load_config(
        "gsm8k-qwen2.5-0.5b-smoke", overrides=["rollout.sglang.weight_sync=object_store"]
    ).ipc_weight_sync
    assert not load_config("tiny-cpu").ipc_weight_sync
    with pytest.raises(ConfigError, match="weight_sync=ipc needs the SGLang engine on the trainer's GPU"):
        load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=[*apart, "rollout.sglang.weight_sync=ipc"])
    base = load_config("gsm8k-qwen2.5-0.5b-smoke")
    other = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=["rollout.sglang.weight_sync=object_store"])
    assert base.config_hash() == other.config_hash()  # how the bits travel, not which bits
