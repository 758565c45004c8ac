"""Exact on-policy mode on the CPU: the key and its rules, the per-iteration mismatch, the failure on a
mismatch, the layer diagnostic, the engine-kernel Megatron modules against Megatron's own, and the
claim itself with its opposite: the hf engine's prefill log-probs and the exact trainer's are bitwise
equal, while the approx trainer's and the decode log-probs are not."""

from pathlib import Path

import numpy as np
import pytest
import torch

from detrl import onpolicy
from detrl.config import ConfigError, HFEngineConfig, is_semantic, load_config
from detrl.rollout import Generation, SamplingParams
from detrl.rollout.hf import HFEngine
from detrl.trainer import GRPOTrainer, Sample

EXACT = ["train.on_policy=exact", "rollout.hf.attn_implementation=sdpa"]


def test_on_policy_key_is_semantic_and_approx_by_default():
    cfg = load_config("tiny-cpu")
    assert cfg.train.on_policy == "approx" and is_semantic("train.on_policy")
    assert load_config("tiny-cpu", overrides=EXACT).config_hash() != cfg.config_hash()


@pytest.mark.parametrize(
    ("profile", "overrides", "says"),
    [
        ("tiny-cpu", ["train.on_policy=exact"], "rollout.hf.attn_implementation=sdpa"),  # eager vs sdpa
        ("tiny-cpu", [*EXACT, "rollout.hf.batching=padded"], "per_sequence"),
        ("tiny-cpu", [*EXACT, "resources.trainer_ranks=2", "resources.tensor_parallel=2"], "tensor_parallel=1"),
        ("gsm8k-smollm2-135m", ["train.on_policy=exact", "rollout.temperature=0.7"], "temperature=1.0"),
        ("gsm8k-smollm2-135m", ["train.on_policy=exact", "determinism.enabled=false"], "determinism.enabled=true"),
        ("gsm8k-smollm2-135m", ["train.on_policy=exact", "rollout.sglang.kernels=sglang"], "kernels=detrl"),
        ("gsm8k-smollm2-135m", ["train.on_policy=exact", "rollout.sglang.attention_backend=triton"], "flashinfer"),
    ],
)
def test_exact_mode_refuses_what_cannot_match_and_says_how(profile, overrides, says):
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        load_config(profile, overrides=overrides)


def test_gpu_profiles_run_exact_mode_by_default_and_a_refusal_names_the_way_out():
    for profile in ("gsm8k-smollm2-135m", "gsm8k-qwen2.5-0.5b-smoke", "gsm8k-qwen2.5-0.5b"):
        assert load_config(profile).train.on_policy == "exact"
    assert load_config("arith-smollm2-135m").train.on_policy == "approx"  # it samples at temperature 0.5
    with pytest.raises(ConfigError, match=r"determinism\.enabled=true.*or set train\.on_policy=approx"):
        load_config("gsm8k-smollm2-135m", overrides=["determinism.enabled=false"])
    off = load_config("gsm8k-smollm2-135m", overrides=["determinism.enabled=false", "train.on_policy=approx"])
    assert not off.determinism.enabled


def test_mismatch_counts_bits_and_names_the_first_token():
    a = [np.array([-1.0, -2.0], np.float32), np.array([], np.float32), np.array([-0.5, 0.0, -3.0], np.float32)]
    assert onpolicy.mismatch(a, [x.copy() for x in a]).stats() == {
        "logprob_max_abs_diff": 0.0,
        "logprob_mean_abs_diff": 0.0,
        "logprob_mismatched_tokens": 0.0,
    }
    b = [x.copy() for x in a]
    b[2][1] = -0.0  # equal as numbers, not as bits
    b[2][2] = np.nextafter(np.float32(-3.0), np.float32(0))
    m = onpolicy.mismatch(a, b)
    assert m.tokens == 2 and m.total == 5 and m.first == (2, 1)
    assert 0 < m.max_abs_diff < 1e-6 and m.mean_abs_diff == pytest.approx(m.max_abs_diff / 5)
    assert "sample 2, token 1" in m.describe(a, b)
    with pytest.raises(ValueError, match="sample 0"):
        onpolicy.mismatch(a, [b[0][:1], b[1], b[2]])


def test_first_difference_names_the_first_op_in_forward_order():
    ops = onpolicy.op_names(2)
    assert ops[:3] == ["embedding", "layers.0.input_norm", "layers.0.attention"] and ops[-1] == "logprobs"
    x = {op: torch.arange(12.0).reshape(3, 4) + i for i, op in enumerate(ops)}
    y = {op: t.clone() for op, t in x.items()}
    assert onpolicy.first_difference(x, y, ops).op is None
    y["layers.1.mlp"][2, 3] += 1
    y["final_norm"][0, 0] += 1
    got = onpolicy.first_difference(x, y, ops)
    assert got.op == "layers.1.mlp" and got.rows == 1 and got.max_abs_diff == 1.0
    del y["layers.1.mlp"]  # ops one side lacks are skipped
    assert onpolicy.first_difference(x, y, ops).op == "final_norm"


def test_the_loop_fails_an_exact_run_on_any_differing_token():
    from detrl.loop import OnPolicyMismatch, check_on_policy
    from detrl.records import StepData, iteration

    gens = [Generation([1, 2], [-0.5, -1.25], "stop"), Generation([3], [-2.0], "length")]
    trainer = [np.array([-0.5, -1.25], np.float32), np.array([-2.0], np.float32)]

    def data(tr):
        z = np.zeros(2, np.float32)
        return StepData(4, [[7]], gens, z, z, tr, [0.1], [1.0], {"w": "x:1"}, {"w": "x:2"}, {"step_s": 1.0})

    exact = load_config("tiny-cpu", overrides=EXACT)
    check_on_policy(exact, data(trainer))
    off = [trainer[0], np.array([-2.0000002], np.float32)]
    check_on_policy(load_config("tiny-cpu"), data(off))  # approx: recorded, never fatal
    with pytest.raises(OnPolicyMismatch, match="iteration 4: 1 of 3 response tokens differ.*sample 1, token 0"):
        check_on_policy(exact, data(off))
    stats = iteration(data(off))["stats"]
    assert stats["logprob_mismatched_tokens"] == 1 and stats["logprob_max_abs_diff"] > 0


def _samples(engine, n=4):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (9 + 3 * i,), generator=g).tolist() for i in range(n)]
    gens = engine.generate(prompts, list(range(1, n + 1)), SamplingParams(12, 1.0, 1.0, ()))
    return [Sample(p, x.token_ids, (-1.0) ** i, x.logprobs) for i, (p, x) in enumerate(zip(prompts, gens))], gens


def test_exact_mode_is_bitwise_on_the_cpu_and_approx_is_not(artifacts):
    cfg = load_config("tiny-cpu", overrides=EXACT)
    engine = HFEngine(artifacts.model.path, cfg.rollout.hf, prefill_logprobs=True)
    samples, gens = _samples(engine)
    decode = HFEngine(artifacts.model.path, cfg.rollout.hf)
    decoded = decode.generate([s.prompt_ids for s in samples], list(range(1, 5)), SamplingParams(12, 1.0, 1.0, ()))
    assert [g.token_ids for g in decoded] == [g.token_ids for g in gens]  # the same samples either way
    rollout = [np.asarray(g.logprobs, np.float32) for g in gens]
    weights = str(Path(artifacts.megatron.path) / "weights")
    exact = GRPOTrainer(cfg, artifacts.model.path, weights)
    approx = GRPOTrainer(load_config("tiny-cpu", overrides=EXACT[1:]), artifacts.model.path, weights)
    try:
        assert onpolicy.mismatch(rollout, exact.score(samples)).tokens == 0
        # the opposite cases: the approx trainer, and the engine's decode log-probs, are not exact
        assert onpolicy.mismatch(rollout, approx.score(samples)).tokens > 0
        assert onpolicy.mismatch([np.asarray(g.logprobs, np.float32) for g in decoded], rollout).tokens > 0
        # the train step's log-probs (before its update) are the rollout's, and it trains on them
        before = exact.weight_hashes()
        res = exact.train_step(samples, [sum(len(s.response_ids) for s in samples)])
        assert onpolicy.mismatch(rollout, res.logprobs).tokens == 0
        assert res.grad_norms[0] > 0 and exact.weight_hashes() != before
    finally:
        approx.close()
        exact.close()


def test_layer_diagnostic_finds_no_op_apart_and_names_a_planted_one(artifacts):
    cfg = load_config("tiny-cpu", overrides=EXACT)
    weights = str(Path(artifacts.megatron.path) / "weights")
    trainer = GRPOTrainer(cfg, artifacts.model.path, weights)
    sdpa = HFEngine(artifacts.model.path, cfg.rollout.hf, prefill_logprobs=True)
    eager = HFEngine(artifacts.model.path, HFEngineConfig(attn_implementation="eager"), prefill_logprobs=True)
    try:
        samples, _ = _samples(sdpa, 1)
        s = samples[0]
        mine: dict = {}
        undo = onpolicy.capture_megatron(trainer.model, mine)
        mine["logprobs"] = torch.from_numpy(trainer.score([s])[0])
        undo()
        ops = onpolicy.op_names(len(trainer.model.decoder.layers))
        for engine, want in ((sdpa, None), (eager, "layers.0.attention")):
            theirs: dict = {}
            undo = onpolicy.capture_hf(engine.model, theirs)
            theirs["logprobs"] = torch.tensor(engine.score(s.prompt_ids, s.response_ids))
            undo()
            got = onpolicy.first_difference(theirs, mine, ops)
            assert got.op == want, got.describe()
            if want is None:
                assert got.compared == ops
    finally:
        trainer.close()


def test_engine_kernel_modules_compute_what_megatron_does(artifacts):
    """The engine-kernel slots (on the CPU: their reference formulas) against Megatron's own modules,
    on right-padded rows: same outputs and gradients within float error, and a row alone equals it
    in the batch."""
    from detrl.megatron import exact
    from detrl.megatron.checkpoint import load_dist_checkpoint
    from detrl.megatron.model import build_gpt_model
    from detrl.megatron.names import ArchMeta
    from detrl.megatron.parallel import model_parallel

    meta = ArchMeta.from_hf_dir(artifacts.model.path)
    with model_parallel(0, 1):
        ref = build_gpt_model(meta, "float32")
        load_dist_checkpoint(ref, str(Path(artifacts.megatron.path) / "weights"))
        ex = build_gpt_model(meta, "float32", engine_kernels=True)
        ex.load_state_dict(ref.state_dict(), strict=False)
        assert [n for n, _ in ex.named_parameters()] == [n for n, _ in ref.named_parameters()]
        lengths = [7, 12, 3]
        tokens = torch.zeros(3, 12, dtype=torch.long)
        g = torch.Generator().manual_seed(0)
        for r, n in enumerate(lengths):
            tokens[r, :n] = torch.randint(0, 1000, (n,), generator=g)
        pos = torch.arange(12)[None].expand(3, 12)
        a = ref(tokens, pos, None)
        with pytest.raises(RuntimeError, match="engine_forward"):
            ex(tokens, pos, None)
        with exact.engine_forward(lengths):
            b = ex(tokens, pos, None)
        for r, n in enumerate(lengths):
            assert torch.allclose(a[r, :n], b[r, :n], atol=1e-5)
        sum(a[r, :n].logsumexp(-1).sum() for r, n in enumerate(lengths)).backward()
        sum(b[r, :n].logsumexp(-1).sum() for r, n in enumerate(lengths)).backward()
        for (name, p), (_, q) in zip(ref.named_parameters(), ex.named_parameters()):
            assert (p.grad - q.grad).abs().max() <= 1e-4 * p.grad.abs().max(), name
        with exact.engine_forward([7]):
            alone = ex(tokens[:1, :7], pos[:1, :7], None)
        assert torch.allclose(alone[0], b[0, :7], atol=1e-6)


def test_the_padded_attention_backward_equals_the_per_sequence_formula():
    """Exact mode's attention backward on a GPU is one causal SDPA over the right-padded rows as Megatron
    lays them out; it must be the gradient of the per-sequence formula (rotary, GQA, rows of different
    lengths, a row of one token), with zeros at the padding."""
    import torch

    from detrl.megatron.exact import attention_ref, pack, rope_attention_padded_ref, rope_ref, rope_table, unpack

    torch.manual_seed(0)
    lengths, width = [5, 7, 1, 7], 7
    real = torch.arange(width)[:, None] < torch.tensor(lengths)[None, :]
    positions = torch.cat([torch.arange(n) for n in lengths])
    bounds = [0, 5, 12, 13, 20]
    table = rope_table(8, 10000.0, 64, torch.device("cpu")).double()
    q = torch.randn(width, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(width, 4, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def per_sequence(q, k, v):
        qs, ks, vs = (pack(t, lengths) for t in (q, k, v))
        out = attention_ref(rope_ref(qs, positions, table), rope_ref(ks, positions, table), vs, bounds)
        return unpack(out, lengths, width)

    a, b = per_sequence(q, k, v), rope_attention_padded_ref(q, k, v, real, table)
    assert torch.allclose(a, b, atol=1e-12)
    assert torch.equal(b[~real], torch.zeros_like(b[~real]))
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), g), torch.autograd.grad(b, (q, k, v), g)):
        assert torch.allclose(x, y, atol=1e-12)
        assert torch.equal(y[~real], torch.zeros_like(y[~real]))  # padding gets no gradient
    # a real token never sees a later one: changing the last key of row 0 changes no output before it
    k2 = k.detach().clone()
    k2[4, 0] += 1.0
    assert torch.equal(rope_attention_padded_ref(q, k2, v, real, table)[:4, 0], b[:4, 0].detach())
    assert not torch.equal(rope_attention_padded_ref(q, k2, v, real, table)[4, 0], b[4, 0].detach())


def test_pack_and_unpack_are_inverse_on_the_real_tokens():
    import torch

    from detrl.megatron.exact import pack, unpack

    lengths, width = [3, 1, 4], 4
    t = torch.arange(width * 3 * 2, dtype=torch.float32).view(width, 3, 2)
    p = pack(t, lengths)
    assert p[:, 0].tolist() == [0.0, 6.0, 12.0, 2.0, 4.0, 10.0, 16.0, 22.0]  # row 0's tokens, then row 1's...
    back = unpack(p, lengths, width)
    real = torch.arange(width)[:, None] < torch.tensor(lengths)[None, :]
    assert torch.equal(back[real], t[real]) and not back[~real].any()
