"""A planted divergence: one bit of one trainer weight flipped in run B, so that a verifier which passes
can be seen to catch what it claims to (`--plant`, and the tests of the verifier)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig


@dataclass
class Perturbation:
    """A planted divergence for tests of the verifier: flip one bit of one weight element."""

    iteration: int
    tensor: str
    when: str = "before_step"  # "before_step" (before the iteration's sync) | "after_step"
    index: int = 0
    bit: int = 22  # fp32: the top mantissa bit

    @classmethod
    def parse(cls, text: str) -> Perturbation:
        """'ITER:TENSOR[:before_step|after_step]', e.g. '1:decoder.layers.0.mlp.linear_fc2.weight'."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0].isdigit() or not parts[1]:
            raise ConfigError(f"planted perturbation {text!r}: expected ITER:TENSOR[:before_step|after_step]")
        when = parts[2] if len(parts) == 3 else "before_step"
        if when not in ("before_step", "after_step"):
            raise ConfigError(f"planted perturbation {text!r}: when must be before_step or after_step")
        return cls(iteration=int(parts[0]), tensor=parts[1], when=when)


def check_plant(p: Perturbation, cfg: RunConfig, meta: Any = None) -> None:
    """A planted flip the run will really apply: at an iteration the run reaches, on a tensor of the trainer
    (by name pattern, or exactly when the model's `meta` is known). ConfigError otherwise: a flip that never
    happens would let the check "pass" without testing anything."""
    from .megatron.names import tensor_problem

    where = f"planted perturbation {p.iteration}:{p.tensor}"
    if p.iteration >= cfg.train.steps:
        raise ConfigError(
            f"{where}: iteration {p.iteration} is never reached (train.steps={cfg.train.steps}, iterations "
            f"0..{cfg.train.steps - 1})"
        )
    if (why := tensor_problem(p.tensor, meta)) is not None:
        raise ConfigError(f"{where}: {why}")


def parse_plants(items: list[str], cfg: RunConfig) -> list[Perturbation]:
    plants = [Perturbation.parse(item) for item in items]
    for p in plants:
        check_plant(p, cfg)
    return plants
