"""GRPO checked against an independent formulation: the loss and gradient of one update written in plain
PyTorch from the formulas (DeepSeekMath's group-normalised advantages, DAPO's asymmetric per-token
clipped ratio, the token-level mean over the update's response tokens), on the HF model det-rl
converted from, compared with what det-rl's Megatron trainer computes. Then the sign: a few updates
raise the log-probability of the rewarded responses and lower the others'."""

from pathlib import Path

import pytest
import torch

from detrl.config import load_config
from detrl.grpo import group_advantages
from detrl.megatron.names import ArchMeta, megatron_to_hf
from detrl.trainer import GRPOTrainer, Sample

EPS_LOW, EPS_HIGH = 0.2, 0.28


def _advantages(rewards: list[float], group: int) -> list[float]:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-6), std with Bessel's correction, written out."""
    out = []
    for g in range(0, len(rewards), group):
        r = rewards[g : g + group]
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / (len(r) - 1)) ** 0.5
        out += [(x - mean) / (std + 1e-6) for x in r]
    return out


def _reference_loss(model, samples: list[Sample], advantages: list[float]) -> torch.Tensor:
    """-1/N sum_i sum_t min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i), N = all response tokens,
    rho = pi(token) / pi_old(token) with pi_old the rollout's recorded log-probs."""
    terms, n = [], 0
    for s, a in zip(samples, advantages):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logits = model(input_ids=ids).logits[0].float()
        p = len(s.prompt_ids)
        logp_all = torch.log_softmax(logits[p - 1 : p - 1 + len(s.response_ids)], dim=-1)
        logp = logp_all[torch.arange(len(s.response_ids)), torch.tensor(s.response_ids)]
        rho = torch.exp(logp - torch.tensor(s.rollout_logprobs))
        surrogate = torch.minimum(rho * a, torch.clamp(rho, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
        terms.append(-surrogate.sum())
        n += len(s.response_ids)
    return torch.stack(terms).sum() / n


def _batch(seed: int = 0) -> tuple[list[Sample], list[float]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 150000, (12 + k,), generator=g).tolist() for k in range(2)]
    samples, rewards = [], []
    for k in range(8):  # 2 groups of 4 samples
        resp = torch.randint(0, 150000, (4 + k % 3,), generator=g).tolist()
        samples.append(Sample(prompts[k // 4], resp, 0.0))
        rewards.append(float(k % 4 in (0, 3) if k < 4 else k % 2))
    return samples, rewards


@pytest.fixture(scope="module")
def setup(artifacts):
    # exact mode: the loss's old policy is the recorded rollout log-probs, so the ratios below are not 1 and
    # both sides of the clip are reached; no gradient clipping, so the gradient is the loss's own
    cfg = load_config(
        "tiny-cpu",
        overrides=["train.on_policy=exact", "rollout.hf.attn_implementation=sdpa", "train.grad_clip=0"],
    )
    return cfg, artifacts.model.path, str(Path(artifacts.megatron.path) / "weights")


def test_group_advantages_equal_the_written_out_formula():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.25, 1.0]
    got = group_advantages(rewards, 4).tolist()
    assert got == pytest.approx(_advantages(rewards, 4), rel=1e-6, abs=1e-6)


def test_one_update_has_the_loss_and_gradient_of_the_independent_formulation(setup):
    from transformers import AutoModelForCausalLM

    cfg, hf_dir, ckpt = setup
    samples, rewards = _batch()
    adv = _advantages(rewards, 4)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # the rollout's log-probs, shifted so that ratios spread across both clip bounds
        shift = torch.linspace(-0.6, 0.6, 64)
        for k, s in enumerate(samples):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            p = len(s.prompt_ids)
            own = lp[torch.arange(p - 1, p - 1 + len(s.response_ids)), torch.tensor(s.response_ids)]
            s.rollout_logprobs = (own + shift[k * 7 : k * 7 + len(own)]).tolist()
            s.advantage = adv[k]
    loss = _reference_loss(model, samples, adv)
    loss.backward()
    ratios = torch.cat(
        [torch.exp(-shift[k * 7 : k * 7 + len(s.response_ids)]) for k, s in enumerate(samples)]
    )  # pi / pi_old at the start of the update
    assert (ratios < 1 - EPS_LOW).any() and (ratios > 1 + EPS_HIGH).any()  # both clip bounds are in play

    trainer = GRPOTrainer(cfg, hf_dir, ckpt)
    try:
        result = trainer.train_step(samples, [sum(len(s.response_ids) for s in samples)])
        grads = {n: m.grad.detach().clone() for n, m in zip(trainer.names, trainer.master)}
    finally:
        trainer.close()
    assert result.losses[0] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    hf_grads = megatron_to_hf(grads, ArchMeta.from_hf_dir(hf_dir))
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(hf_grads) <= set(ref_grads) | {"lm_head.weight"}
    for name, g in hf_grads.items():
        ref = ref_grads.get(name)
        if ref is None:
            continue
        scale = ref.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_updates_raise_the_log_probability_of_rewarded_responses(setup):
    """The sign: on-policy updates (approx, ratio 1) raise the GRPO objective sum_i A_i log pi(y_i), and in
    every group the rewarded responses gain log-probability against the unrewarded ones."""
    _, hf_dir, ckpt = setup
    cfg = load_config("tiny-cpu", overrides=["train.weight_decay=0"])
    samples, rewards = _batch(1)
    adv = group_advantages(rewards, 4).tolist()
    for s, a in zip(samples, adv):
        s.advantage = a
    trainer = GRPOTrainer(cfg, hf_dir, ckpt)
    try:
        before = [float(row.sum()) for row in trainer.score(samples)]
        for _ in range(3):
            trainer.train_step(samples, [sum(len(s.response_ids) for s in samples)])
        after = [float(row.sum()) for row in trainer.score(samples)]
    finally:
        trainer.close()
    objective = [sum(a * lp for a, lp in zip(adv, lps)) for lps in (before, after)]
    assert objective[1] > objective[0], objective
    for g in range(0, len(samples), 4):
        idx = range(g, g + 4)
        gain = [after[i] - before[i] for i in idx]
        good = [gain[i - g] for i in idx if adv[i] > 0]
        bad = [gain[i - g] for i in idx if adv[i] < 0]
        assert good and bad and min(good) > max(bad), (g, gain, [adv[i] for i in idx])
