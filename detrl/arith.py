"""`arith`: a builtin task generated from a fixed seed, needing no network: one-step arithmetic word
problems (add, take away, groups of) with GSM8K-style answers ending in `#### N`, so the `gsm8k`
reward scores them. Small enough for SmolLM2-135M-Instruct to solve some and fail others, so GRPO groups
have reward variance and there is room to learn. Splits: `train` and a held-out `test` drawn from
other generator streams (no problem text is shared)."""

from __future__ import annotations

import numpy as np

SPLITS = {"train": (0, 2000), "test": (1, 200)}
NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Eli", "Ivy")
THINGS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells")


def _problem(rng: np.random.Generator) -> dict[str, str]:
    name, thing = NAMES[rng.integers(len(NAMES))], THINGS[rng.integers(len(THINGS))]
    kind = int(rng.integers(3))
    if kind == 0:
        a, b = (int(x) for x in rng.integers(1, 20, size=2))
        q = f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?"
        work, ans = f"{a} + {b} = {a + b}", a + b
    elif kind == 1:
        a = int(rng.integers(5, 20))
        b = int(rng.integers(1, a))
        q = f"{name} has {a} {thing} and gives away {b} of them. How many {thing} does {name} have left?"
        work, ans = f"{a} - {b} = {a - b}", a - b
    else:
        a, b = (int(x) for x in rng.integers(2, 6, size=2))
        q = f"{name} has {a} boxes with {b} {thing} in each box. How many {thing} does {name} have in all?"
        work, ans = f"{a} * {b} = {a * b}", a * b
    return {"question": q, "answer": f"{work}\n#### {ans}"}


def rows(split: str) -> list[dict[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"the arith task has splits {sorted(SPLITS)}, not {split!r}")
    stream, n = SPLITS[split]
    rng = np.random.default_rng([20261203, stream])
    out = [_problem(rng) for _ in range(n)]
    if split != "train":  # held out: no question that also appears in train
        seen = {r["question"] for r in rows("train")}
        out = [r for r in out if r["question"] not in seen]
    return out
