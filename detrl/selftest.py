"""Batch-invariance self-test of the engine in use, in the three modes of SGLang's own determinism
test: `single` (one prompt inside batches of varying size), `mixed` (the prompt among prompts of
different prefix lengths, in varying order), `prefix` (the prompt's prefix cached by an earlier request
vs computed fresh). Each mode reports "Unique samples: N"; N == 1 passes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .rollout import SamplingParams

MODES = ("single", "mixed", "prefix")


@dataclass
class SelfTestResult:
    unique: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(n == 1 for n in self.unique.values())

    def lines(self) -> list[str]:
        return [f"{mode}: Unique samples: {n} {'PASS' if n == 1 else 'FAIL'}" for mode, n in self.unique.items()]


def _prompts(rng: np.random.Generator, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    return [rng.integers(100, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def vocab_bound(model_dir: str) -> int:
    """Token ids the self-test may draw: below the model's vocabulary (capped at 150000, the bound the
    Qwen2 profiles were measured with)."""
    return min(150000, int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]))


def _key(g: Any) -> tuple:
    return tuple(g.token_ids), np.asarray(g.logprobs, dtype=np.float64).tobytes()


def batch_invariance(
    engine: Any, *, quick: bool = True, seed: int = 1234, temperature: float = 1.0, vocab: int = 150000
) -> SelfTestResult:
    rng = np.random.default_rng(seed)
    max_bs = 4 if quick else 16
    params = SamplingParams(max_new_tokens=8 if quick else 32, temperature=temperature)
    target = _prompts(rng, 1, 40, 41, vocab)[0]
    others = _prompts(rng, max_bs, 5, 120, vocab)
    res = SelfTestResult(settings={"max_batch": max_bs, "new_tokens": params.max_new_tokens, "seed": seed})

    outs = set()
    for bs in range(1, max_bs + 1):  # single: the same prompt inside batches of size 1..max_bs
        pos = (bs - 1) // 2
        batch = others[: bs - 1]
        batch = batch[:pos] + [target] + batch[pos:]
        seeds = [seed if i == pos else seed + 1 + i for i in range(bs)]
        outs.add(_key(engine.generate(batch, seeds, params)[pos]))
    res.unique["single"] = len(outs)

    outs = set()
    for _ in range(3 if quick else 8):  # mixed: different neighbours and prefix lengths, shuffled order
        neigh = _prompts(rng, int(rng.integers(1, max_bs)), 5, 200, vocab)
        batch = neigh + [target]
        order = rng.permutation(len(batch)).tolist()
        shuffled = [batch[i] for i in order]
        seeds = [seed if order[i] == len(batch) - 1 else seed + 100 + i for i in range(len(batch))]
        outs.add(_key(engine.generate(shuffled, seeds, params)[order.index(len(batch) - 1)]))
    res.unique["mixed"] = len(outs)

    fresh = _key(engine.generate([target], [seed], params)[0])
    # prefix: the target's first 32 tokens served from the engine's prefix cache (where it has one)
    engine.generate([target[:32] + _prompts(rng, 1, 8, 9, vocab)[0]], [seed + 7], params)
    cached = _key(engine.generate([target], [seed], params)[0])
    res.unique["prefix"] = len({fresh, cached})
    return res
