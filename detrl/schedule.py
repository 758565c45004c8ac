"""How a run's rollout requests reach its engine. Run A sends each iteration's batch as it comes, in one
submission. Run B of a twice-run (`verify.perturb_schedule`, on by default) sends the same requests
differently: shuffled per iteration, to an SGLang engine started with other batch limits (on the hf
engine, which has none, cut into several submissions instead). Its outputs are put back in place, so
what is computed is unchanged; only which requests share a batch is. Two runs with one schedule see the
same batches, so even batch-variant kernels can repeat themselves; a perturbed run B passes only when
the engine is batch-invariant.

Everything is derived from the run seed, recorded in B's ledger header and named in the verdict."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .config import RunConfig, sglang_prefill_tile

T = TypeVar("T")


@dataclass(frozen=True)
class Schedule:
    seed: int | None = None  # None: the requests in their own order; else shuffled per iteration
    submissions: int = 1
    engine_args: dict[str, int] = field(default_factory=dict)  # SGLang batch limits (config.SCHEDULE_ONLY)

    @property
    def perturbed(self) -> bool:
        return self.seed is not None or self.submissions > 1 or bool(self.engine_args)

    def order(self, iteration: int, n: int) -> list[int]:
        if self.seed is None:
            return list(range(n))
        return np.random.default_rng([self.seed, iteration]).permutation(n).tolist()

    def generate(
        self,
        send: Callable[[list[Any], list[int] | None], list[T]],
        prompts: Sequence[Any],
        seeds: Sequence[int] | None,
        iteration: int,
    ) -> list[T]:
        """`send(prompts, seeds)` once per submission; the outputs come back in the requests' order."""
        order = self.order(iteration, len(prompts))
        parts = [p for p in np.array_split(np.asarray(order, dtype=np.int64), self.submissions) if len(p)]
        out: list[Any] = [None] * len(prompts)
        for part in parts:
            idx = part.tolist()
            got = send([prompts[i] for i in idx], None if seeds is None else [seeds[i] for i in idx])
            if len(got) != len(idx):
                raise RuntimeError(f"the engine answered {len(got)} of {len(idx)} requests")
            for i, g in zip(idx, got):
                out[i] = g
        return out

    def record(self) -> dict[str, Any]:
        """What B's ledger header holds."""
        return {
            "perturbed": self.perturbed,
            "order_seed": self.seed,
            "submissions": self.submissions,
            "engine_args": dict(self.engine_args),
        }

    def describe(self) -> str:
        if not self.perturbed:
            return "as given, one submission per iteration"
        parts = []
        if self.seed is not None:
            parts.append(f"requests shuffled per iteration (order seed {self.seed})")
        if self.submissions > 1:
            parts.append(f"sent in {self.submissions} submissions")
        if self.engine_args:
            parts.append("engine limits " + ", ".join(f"{k}={v}" for k, v in sorted(self.engine_args.items())))
        return "; ".join(parts)


PLAIN = Schedule()


def describe_record(rec: dict[str, Any] | None) -> str:
    """`describe` of a header's recorded schedule (None: a ledger from before schedules were recorded)."""
    if not isinstance(rec, dict):
        return "not recorded (as given)"
    try:
        return Schedule(
            rec.get("order_seed"), int(rec.get("submissions", 1)), dict(rec.get("engine_args") or {})
        ).describe()
    except (TypeError, ValueError):
        return f"unreadable ({rec!r:.80})"


def _pick(options: Sequence[int], avoid: int | None, h: int) -> int:
    choices = [o for o in options if o != avoid] or list(options)
    return choices[h % len(choices)]


def perturbed(cfg: RunConfig) -> Schedule:
    """Run B's schedule: derived from the run seed, never the one run A gets."""
    h = int.from_bytes(hashlib.sha256(f"detrl-schedule-{cfg.seed}".encode()).digest()[:8], "little")
    n = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    # on SGLang each submission waits for its longest response, so a second one makes B's rollout wait twice and
    # forms no batch the running-request limit below does not already form (requests queue behind it and join
    # decode batches as others finish): one. The hf engine computes sequence by sequence (per_sequence) or per
    # submission (padded), so four cost nothing there and are its only way to form other batches
    submissions = min(n, 1 if cfg.backends.rollout == "sglang" else 4)
    engine_args: dict[str, int] = {}
    if cfg.backends.rollout == "sglang":
        sg = cfg.rollout.sglang
        # a quarter of the requests (or more) queued behind the rest, so batches form and shrink differently
        running = _pick((3 * n // 4, 5 * n // 8), sg.max_running_requests, h >> 4)
        if running == sg.cuda_graph_max_bs:
            running -= 1
        running = max(1, running)
        engine_args["max_running_requests"] = running
        # every decode batch replays a CUDA graph, of a capture list that ends where run A's does not: a
        # batch above the graph limit runs eagerly, many times slower, and adds nothing the kernels'
        # batch invariance does not already cover (the padding to a captured size differs either way)
        engine_args["cuda_graph_max_bs_decode"] = running
        # prefill batches of another token budget: one tile or three, never less than one (a smaller chunk
        # never schedules a longer request: config.SGLANG_PREFILL_TILE_ENV); SGLang's own default on an
        # H100 or H200 is two
        tile = sglang_prefill_tile(sg.attention_backend) or sglang_prefill_tile()
        assert tile
        engine_args["chunked_prefill_size"] = _pick((tile, 3 * tile), sg.chunked_prefill_size, h >> 16)
    return Schedule(seed=int((h >> 24) & 0x7FFFFFFF), submissions=submissions, engine_args=engine_args)


def for_run(cfg: RunConfig, label: str) -> Schedule:
    """The schedule of run `label` ("A" or "B") of a twice-run."""
    return perturbed(cfg) if label == "B" and cfg.verify.perturb_schedule else PLAIN
