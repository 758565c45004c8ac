"""`detrl eval RUN`: the held-out eval of a run's checkpoint, as the run itself would have recorded it. The
checkpoint saved after iteration k holds the policy entering iteration k+1; when the run evaluated that
iteration, the recomputed eval must equal the recorded one, tokens and all (a reproducibility check of
the eval path on its own)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import CKPT_DIR, Checkpoint, latest_checkpoint, saved
from .config import ConfigError, config_from_json
from .ledger import read_ledger


@dataclass
class EvalResult:
    checkpoint: int  # the iteration whose checkpoint was loaded
    iteration: int  # the iteration whose entering policy that is
    accuracy: float
    tokens: str
    prompts: int
    recorded: dict[str, Any] | None  # the run's own eval of that iteration, if it made one

    @property
    def matches(self) -> bool | None:
        return None if self.recorded is None else self.recorded["tokens"] == self.tokens

    def text(self) -> str:
        line = (
            f"held-out accuracy {self.accuracy:.4f} on {self.prompts} prompts: the policy entering iteration "
            f"{self.iteration} (checkpoint after iteration {self.checkpoint})"
        )
        if self.recorded is None:
            return line + "; the run did not evaluate that iteration"
        same = "equals" if self.matches else "DIFFERS from"
        return line + f"; {same} the run's own eval of it (accuracy {self.recorded['accuracy']:.4f})"


def _checkpoint(run_dir: Path, iteration: int | None) -> Checkpoint:
    if iteration is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"{run_dir} holds no complete checkpoint (the run needs checkpoint.every=K)")
        return ckpt
    if not saved(run_dir, iteration):
        kept = sorted(p.name for p in (run_dir / CKPT_DIR).glob("iter_*"))
        raise ConfigError(f"{run_dir} has no checkpoint after iteration {iteration}; it keeps {kept or 'none'}")
    return Checkpoint(iteration, run_dir / CKPT_DIR / f"iter_{iteration:05d}")


def evaluate_checkpoint(run_dir: str | Path, cache_dir: str | Path, checkpoint: int | None = None) -> EvalResult:
    from .loop import Step, prepare
    from .ray.group import Workers

    run_dir = Path(run_dir)
    led = read_ledger(run_dir)
    if led.header is None or led.invalid:
        raise ConfigError(f"{run_dir} holds no valid ledger to evaluate: {led.problems[:2]}")
    cfg = config_from_json(led.header["config"])
    if not cfg.eval.every:
        raise ConfigError(
            f"{run_dir} was run with eval.every=0: it held no rows out, so every row may have been trained on"
        )
    ckpt = _checkpoint(run_dir, checkpoint)
    arts = prepare(cfg, cache_dir)
    recorded = led.header["artifacts"]
    for name, art in (("model", arts.model), ("data", arts.data)):
        if recorded[name]["sha256"] != art.sha256:
            want = recorded[name]["sha256"][:16]
            raise ConfigError(f"the cache's {name} is not the run's (sha256 {art.sha256[:16]}, the run's {want})")
    step = Step(cfg, arts, [])
    it = ckpt.iteration + 1
    with Workers(cfg, arts.model.path, str(Path(arts.megatron.path) / "weights")) as w:
        w.load_checkpoint(str(ckpt.path))
        w.sync_policy(it, update=True)
        ev = step.evaluate(w, it)
    rec = led.iterations[it].get("eval") if it < len(led.iterations) else None
    return EvalResult(ckpt.iteration, it, ev["accuracy"], ev["tokens"], ev["prompts"], rec)
