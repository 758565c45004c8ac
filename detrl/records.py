"""What a run writes: the ledger's header, iteration and completion records, and the per-step arrays
verify reads to locate a divergence."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np

from . import __version__
from .config import RunConfig
from .determinism import fingerprint
from .ledger import LEDGER_VERSION, array_sha256, combine, ragged, ragged_sha256
from .onpolicy import Mismatch, mismatch
from .rollout import Generation
from .schedule import PLAIN, Schedule
from .util import utc_stamp


def header(
    cfg: RunConfig,
    artifacts: Any,
    workers: Any,
    selftest: dict[str, Any] | None,
    prompts: Any,
    schedule: Schedule = PLAIN,
    reward: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "kind": "header",
        "version": LEDGER_VERSION,
        "run_id": uuid.uuid4().hex,
        "detrl": __version__,
        "profile": cfg.profile,
        "config": cfg.recorded_dict(),
        "config_hash": cfg.config_hash(),
        "artifacts": {
            "model": asdict(artifacts.model),
            "data": asdict(artifacts.data),
            "megatron": asdict(artifacts.converted()),
            **({"reward": reward} if reward else {}),
        },
        "engine": workers.engine_info,
        "selftest": selftest,
        "prompts_available": len(prompts),
        "prompts_dropped": prompts.dropped,
        "fingerprints": {"driver": fingerprint("driver"), **workers.fingerprints},
        "placement": workers.placement,
        "startup_s": workers.startup_s,
        "schedule": schedule.record(),
        "started_at": utc_stamp(),
    }


@dataclass
class StepData:
    """Everything one iteration produced, in the driver."""

    iteration: int
    prompt_ids: list[list[int]]  # the batch's prompts, once each
    gens: list[Generation]  # samples_per_prompt per prompt
    rewards: np.ndarray
    advantages: np.ndarray
    trainer_logprobs: list[np.ndarray]
    losses: list[float]
    grad_norms: list[float]
    sent: dict[str, str]  # digests of the policy the engine proved it holds
    weights: dict[str, str]  # digests of the trainer's weights after the step
    times: dict[str, float]
    evaluation: dict[str, Any] | None = None  # the held-out greedy eval of the policy entering the iteration

    @cached_property
    def rollout_logprobs(self) -> list[np.ndarray]:  # hashed and saved: converted once
        return [np.asarray(g.logprobs, dtype=np.float32) for g in self.gens]

    @cached_property
    def mismatch(self) -> Mismatch:
        """How far the trainer's log-probs are from the rollout's, token by token."""
        return mismatch(self.rollout_logprobs, self.trainer_logprobs)


def iteration(d: StepData) -> dict[str, Any]:
    rec = _iteration(d)
    if d.evaluation is not None:
        ev = d.evaluation
        rec["eval"] = {"tokens": ev["tokens"], "accuracy": ev["accuracy"], "prompts": ev["prompts"]}
        rec["stats"].update(eval_accuracy=ev["accuracy"], eval_s=ev["eval_s"])
    return rec


def _iteration(d: StepData) -> dict[str, Any]:
    rollout_lp = d.rollout_logprobs
    return {
        "kind": "iteration",
        "iteration": d.iteration,
        "hashes": {
            "policy_weights": combine(d.sent),
            "prompts": ragged_sha256(d.prompt_ids, np.int64),
            "rollout_tokens": ragged_sha256([g.token_ids for g in d.gens], np.int64),
            "rollout_logprobs": ragged_sha256(rollout_lp, np.float32),
            "rewards": array_sha256(d.rewards),
            "advantages": array_sha256(d.advantages.astype(np.float32)),
            "trainer_logprobs": ragged_sha256(d.trainer_logprobs, np.float32),
            "loss": array_sha256(np.asarray(d.losses, dtype=np.float64)),
            "grad_norm": array_sha256(np.asarray(d.grad_norms, dtype=np.float64)),
            "weights": combine(d.weights),
        },
        "tensors": {
            "policy_weights": [[n, d.sent[n]] for n in d.sent],
            "weights": [[n, d.weights[n]] for n in d.weights],
        },
        "stats": {
            **rollout_shape(d.gens, d.rewards),
            "loss": float(np.mean(d.losses)),
            "grad_norm": float(np.mean(d.grad_norms)),
            "train_tokens": len(d.gens) // len(d.prompt_ids) * sum(len(p) for p in d.prompt_ids)
            + sum(len(g.token_ids) for g in d.gens),
            **d.mismatch.stats(),
            **d.times,
        },
    }


def completion(cfg: RunConfig, final_weights: str, wall_s: float) -> dict[str, Any]:
    return {
        "kind": "complete",
        "iterations": cfg.train.steps,
        "final_weights": final_weights,
        "wall_s": wall_s,
        "finished_at": utc_stamp(),
    }


def step_arrays(d: StepData) -> dict[str, np.ndarray]:
    p_flat, p_len = ragged(d.prompt_ids, np.int64)
    t_flat, t_len = ragged([g.token_ids for g in d.gens], np.int64)
    return {
        "prompts": p_flat,
        "prompts_len": p_len,
        "rollout_tokens": t_flat,
        "rollout_tokens_len": t_len,
        "rollout_logprobs": ragged(d.rollout_logprobs, np.float32)[0],
        "rewards": d.rewards.astype(np.float32),
        "advantages": d.advantages.astype(np.float32),
        "trainer_logprobs": ragged(d.trainer_logprobs, np.float32)[0],
        "loss": np.asarray(d.losses, dtype=np.float64),
        "grad_norm": np.asarray(d.grad_norms, dtype=np.float64),
    }


def rollout_shape(gens: Sequence[Generation], rewards: np.ndarray) -> dict[str, float]:
    """How the rollout looked: response lengths, how many ended at EOS (so the decode batch shrank)
    rather than at max_new_tokens, and how many samples the reward paid."""
    lengths = np.asarray([len(g.token_ids) for g in gens])
    return {
        "mean_reward": float(rewards.mean()),
        "nonzero_reward_fraction": float(np.mean(rewards != 0)),
        "mean_response_len": float(lengths.mean()),
        "response_len_min": int(lengths.min()),
        "response_len_median": float(np.median(lengths)),
        "response_len_max": int(lengths.max()),
        "eos_fraction": float(np.mean([g.finish_reason == "stop" for g in gens])),
    }


def progress_line(stats: dict[str, Any]) -> str:
    return (
        f"reward {stats['mean_reward']:.3f} (rewarded {stats['nonzero_reward_fraction']:.0%}) "
        f"loss {stats['loss']:+.6f} grad-norm {stats['grad_norm']:.4f} "
        f"len {stats['response_len_min']}/{stats['response_len_median']:.0f}/"
        f"{stats['response_len_max']} EOS {stats['eos_fraction']:.0%} "
        f"|lp trainer-rollout| {stats['logprob_max_abs_diff']:.2e}"
        f"{_mismatched(stats)} step {stats['step_s']:.2f}s"
        + (f" held-out accuracy {stats['eval_accuracy']:.3f}" if "eval_accuracy" in stats else "")
    )


def _mismatched(stats: dict[str, Any]) -> str:
    n = stats.get("logprob_mismatched_tokens")
    return "" if n is None else f" ({int(n)} tokens differ)"
