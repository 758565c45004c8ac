"""The rollout engine as a Ray actor. The engine (SGLang or the hf engine) is imported when `setup`
starts it; Megatron never is, in this process or any it starts (`HIDDEN`). Nothing this module imports
at its top imports torch: `prepare`, first in the actor's queue, starts SGLang's processes (and their
imports of SGLang) before this process spends seconds importing torch."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import quiet, weight_sync
from ..config import RunConfig, config_from_json
from .actor_common import checks_as_dicts, need_paths, process_info

if TYPE_CHECKING:
    from ..rollout import Generation, SamplingParams


# Installed beside the engine, never used by the rollout process tree, and imported by SGLang at start
# when present (see `sglang_plugin.hide`): the import costs each scheduler process seconds.
HIDDEN = ("megatron",)


def import_own_work() -> None:
    """Import what the actor's work between `prepare` and `setup` imports (`env`, `check`): torch, and
    torch._inductor's config, which `torch.use_deterministic_algorithms` imports with hundreds of
    modules (SGLang's import shares them)."""
    import torch._inductor.config  # noqa: F401

    from .. import determinism, doctor  # noqa: F401
    from . import env  # noqa: F401  (the checks' own, imported where they run)


class RolloutActor:
    def __init__(self, cfg_json: str, model_dir: str, schedule_args: dict[str, int] | None = None):
        quiet.install()
        self.cfg, self.model_dir = config_from_json(cfg_json), model_dir
        self.schedule_args = schedule_args
        self.engine: Any = None
        self.prepared: Any = None
        self.path_folder: Path | None = None

    def env(self) -> dict[str, Any]:
        return process_info("rollout")

    def prepare(self) -> None:
        """Start what the engine can start before `setup` (SGLang's processes, which import SGLang
        meanwhile): the group calls it first, so that it overlaps the other workers' env check."""
        from ..rollout import prepare_engine, sglang_plugin

        self.path_folder = sglang_plugin.hide(sglang_plugin.path_folder(), HIDDEN)
        self.prepared = prepare_engine(self.cfg)
        # this process's own import of SGLang runs beside `env` and `check`: what they import is imported
        # first, on this thread (two threads importing one module graph at once can fail; see
        # `Start.import_engine`)
        import_own_work()
        if self.prepared is not None:
            self.prepared.import_engine()

    def setup(self) -> dict[str, Any]:
        from ..determinism import apply_process_settings
        from ..rollout import make_engine

        need_paths(self.model_dir)
        if self.path_folder is None:
            self.prepare()
        if self.prepared is not None:
            self.prepared.imported()  # before this thread imports anything more
        apply_process_settings(self.cfg.determinism.enabled, self.cfg.seed, self.cfg.resources.cpu_threads)
        prepared, self.prepared = self.prepared, None
        self.engine = make_engine(self.cfg, self.model_dir, self.schedule_args, prepared)
        return self.engine.info()

    def fingerprint(self) -> dict[str, Any]:
        from ..determinism import fingerprint

        # the schedule's batch limits are the run's schedule (in the header), not its environment
        info = {k: v for k, v in self.engine.info().items() if k != "schedule_args"}
        return fingerprint("rollout", {"engine": info})

    def generate(self, prompts: list[list[int]], seeds: list[int] | None, params: SamplingParams) -> list[Generation]:
        return self.engine.generate(prompts, seeds, params)

    def check(self, fn: Callable[[str, RunConfig], list[Any]]) -> list[dict[str, Any]]:
        return checks_as_dicts(fn("rollout", self.cfg))

    def selftest(self, quick: bool = True) -> dict[str, Any]:
        from ..selftest import batch_invariance, vocab_bound

        res = batch_invariance(self.engine, quick=quick, vocab=vocab_bound(self.model_dir))
        return {"passed": res.passed, "unique": res.unique, "settings": res.settings}

    def load_weights(self, transport: str, payload: Any, expected: Any, update: bool) -> tuple[list[str], float]:
        """Load the trainer's weights (when `update`): the tensors the engine does not hold exactly as sent,
        and the seconds the load and its proof took in this process."""
        t = time.perf_counter()
        bad = weight_sync.module(transport).load(self.engine, payload, expected, update)
        return bad, time.perf_counter() - t

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.prepared is not None:  # prepared, never set up (a refused env)
            self.prepared.abandon()
            self.prepared = None
        if self.path_folder is not None:  # the actor is killed after this: no atexit handler runs
            shutil.rmtree(self.path_folder, ignore_errors=True)
            self.path_folder = None
