"""The deterministic GRPO loop. Per iteration: sync the policy to the engine and prove it holds the
trainer's weights -> pick prompts -> roll out -> rewards -> advantages -> train step -> record
every phase's hash in the ledger."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from . import checkpoints, records, rewards
from .artifacts import Artifacts, compile_cache_dir, prepare
from .config import RunConfig
from .data import DataError, PromptSet, read_dataset, sample_seed
from .grpo import Sample, group_advantages
from .ledger import LEDGER_FILE, LedgerWriter, ragged_sha256, save_step_data, step_data_bytes
from .megatron.names import ArchMeta, check_tensor_parallel
from .plant import Perturbation, check_plant
from .ray.errors import RunError, WeightSyncError
from .ray.group import Workers
from .records import progress_line, rollout_shape
from .rollout import SamplingParams
from .rundir import check_out_dir, exclusive
from .schedule import PLAIN, Schedule
from .util import atomic_write_text

__all__ = [
    "Artifacts",
    "compile_cache_dir",
    "OnPolicyMismatch",
    "RunError",
    "RunSummary",
    "WeightSyncError",
    "prepare",
    "progress_line",
    "rollout_shape",
    "run",
]


class OnPolicyMismatch(RunError):
    """Exact on-policy mode: the trainer's forward did not reproduce the rollout's log-probs."""


@dataclass
class RunSummary:
    run_dir: str
    iterations: int
    wall_s: float
    final_weights: str
    stats: list[dict[str, Any]] = field(default_factory=list)


def run(
    cfg: RunConfig,
    run_dir: str | Path,
    artifacts: Artifacts,
    *,
    resume: bool = False,
    perturbations: Sequence[Perturbation] = (),
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    schedule: Schedule = PLAIN,
) -> RunSummary:
    """Run the loop once into `run_dir` (ledger.jsonl, fingerprint.json, config.json, steps/,
    checkpoints/). `resume`: continue an interrupted run from its last checkpoint, or from its start
    when it wrote none, recomputing the recorded iterations after that point: each must equal its
    record (checkpoints.ResumeDivergence otherwise), so the ledger ends identical, record for record, to
    one of a run that never stopped. `schedule`: how the rollout requests reach the engine (run B of a
    twice-run: detrl.schedule.perturbed)."""
    meta = ArchMeta.from_hf_dir(artifacts.model.path)
    check_tensor_parallel(meta, cfg.resources.tensor_parallel)
    for p in perturbations:
        check_plant(p, cfg, meta)  # against this model's own tensor names, before any worker starts
    run_dir = Path(run_dir)
    if not resume:
        check_out_dir(run_dir)  # before the lock creates the directory: nothing of another run is mixed in
    created = not run_dir.exists()
    try:
        with exclusive(run_dir):
            return _run_locked(cfg, run_dir, artifacts, resume, perturbations, progress, schedule)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty --out behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise


def _run_locked(
    cfg: RunConfig,
    run_dir: Path,
    artifacts: Artifacts,
    resume: bool,
    perturbations: Sequence[Perturbation],
    progress: Callable[[int, int, dict[str, Any]], None] | None,
    schedule: Schedule,
) -> RunSummary:
    start = checkpoints.start_point(cfg, run_dir, resume)
    if start.done is not None:
        final = (start.done.completion or {}).get("final_weights", "")
        return RunSummary(str(run_dir), len(start.done.iterations), 0.0, final)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    step = Step(cfg, artifacts, perturbations, schedule)
    summary = RunSummary(str(run_dir), start.iteration, 0.0, "")
    recorded = start.recorded.iterations if start.recorded else []

    workers = Workers(
        cfg,
        artifacts.model.path,
        artifacts.checkpoint,
        compile_cache=artifacts.compile_cache,
        schedule_args=schedule.engine_args,
        before_load=artifacts.converted,  # a conversion still running ends while the engine starts
    )
    with workers as w:
        header = records.header(cfg, artifacts, w, w.selftest(), step.prompts, schedule, step.reward.identity())
        if start.resuming:
            checkpoints.restore(w, run_dir, start, header)
        else:
            _write_run_files(run_dir, cfg, header)
        with LedgerWriter(run_dir / LEDGER_FILE, drop_torn_tail=start.resuming) as ledger:
            if not start.resuming:
                ledger.append(header)
            for it in range(start.iteration, cfg.train.steps):
                data = step(w, it)
                record = records.iteration(data)
                blob = step_data_bytes(records.step_arrays(data)) if cfg.ledger.keep_step_data else None
                if blob is not None:  # the record hashes the file a verdict reads tokens from
                    record["step_data"] = hashlib.sha256(blob).hexdigest()
                if it < len(recorded):  # resumed: recomputed, proven equal, the record and its data kept
                    checkpoints.check_recomputed(run_dir, recorded[it], record)
                else:
                    if blob is not None:
                        save_step_data(run_dir, it, blob)
                    ledger.append(record)
                check_on_policy(cfg, data)  # after the record: the ledger keeps what was measured
                if checkpoints.due(cfg, it) and not checkpoints.saved(run_dir, it):
                    checkpoints.save(w, run_dir, it, cfg)
                summary.stats.append(record["stats"])
                summary.iterations, summary.final_weights = it + 1, record["hashes"]["weights"]
                if progress is not None:
                    progress(it, cfg.train.steps, record["stats"])
            summary.wall_s = time.perf_counter() - t_start
            ledger.append(records.completion(cfg, summary.final_weights, summary.wall_s))
    return summary


def check_on_policy(cfg: RunConfig, data: records.StepData) -> None:
    """Exact on-policy mode: any response token whose trainer and rollout log-probs differ fails the run."""
    if cfg.train.on_policy == "exact" and data.mismatch.tokens:
        raise OnPolicyMismatch(
            f"train.on_policy=exact, iteration {data.iteration}: "
            + data.mismatch.describe(data.rollout_logprobs, data.trainer_logprobs)
            + " (`python benchmarks/onpolicy_diff.py` names the first op that differs)"
        )


def _write_run_files(run_dir: Path, cfg: RunConfig, header: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=1, sort_keys=True))
    atomic_write_text(run_dir / "fingerprint.json", json.dumps(header["fingerprints"], indent=1, sort_keys=True))


class Step:
    """One GRPO iteration, phase by phase, over a run's workers."""

    def __init__(
        self, cfg: RunConfig, artifacts: Artifacts, perturbations: Sequence[Perturbation], schedule: Schedule = PLAIN
    ):
        self.cfg, self.schedule = cfg, schedule
        tokenizer = AutoTokenizer.from_pretrained(artifacts.model.path)
        rows = read_dataset(artifacts.data)
        held = cfg.eval.prompts if cfg.eval.every else 0
        if held and len(rows) <= held:
            raise DataError(
                f"eval.prompts={held} would hold out every one of the dataset's {len(rows)} rows; lower eval.prompts"
            )
        self.prompts = PromptSet(rows[: len(rows) - held], tokenizer, cfg.data, cfg.seed)
        # the held-out rows, in dataset order: never trained on
        self.eval_set = PromptSet(rows[len(rows) - held :], tokenizer, cfg.data, cfg.seed) if held else None
        first = self.prompts.batch(0, 1)
        probe_meta = {**first.metas[0], "iteration": 0, "sample": 0}
        self.reward = rewards.load(cfg.reward, tokenizer, (first.answers[0], probe_meta))
        self.params = SamplingParams(
            cfg.rollout.max_new_tokens,
            cfg.rollout.temperature,
            cfg.rollout.top_p,
            stop_ids(tokenizer, artifacts.model.path),
        )
        self.plant = {(p.iteration, p.when): p for p in perturbations}
        self.eval_params = SamplingParams(
            cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, 0.0, 1.0, self.params.stop_token_ids
        )

    def __call__(self, w: Workers, it: int) -> records.StepData:
        cfg, P, G = self.cfg, self.cfg.rollout.prompts_per_step, self.cfg.rollout.samples_per_prompt
        t0 = time.perf_counter()
        self._maybe_flip(w, it, "before_step")
        # 1. policy sync; at iteration 0 the engine loaded the same checkpoint from disk, and proving
        # it holds the trainer's weights checks the conversion
        sent, sync_parts = w.sync_policy(it, update=it > 0 or (0, "before_step") in self.plant)
        t_sync = time.perf_counter()
        evaluation = self.evaluate(w, it) if self.cfg.eval_due(it) else None
        t_eval = time.perf_counter()
        # 2. prompts and rollout
        batch = self.prompts.batch(it, P)
        prompt_ids = [p for p in batch.prompt_ids for _ in range(G)]
        seeds = [sample_seed(cfg.sampling_seed, it, j, P * G) for j in range(P * G)] if cfg.pins_seeds else None
        gens = self.schedule.generate(lambda p, s: w.generate(it, p, s, self.params), prompt_ids, seeds, it)
        t_roll = time.perf_counter()
        # 3. rewards and group-normalized advantages
        answers = [a for a in batch.answers for _ in range(G)]
        metas = [{**batch.metas[j // G], "iteration": it, "sample": j} for j in range(P * G)]
        scores = [self.reward.score(g.token_ids, a, m) for g, a, m in zip(gens, answers, metas)]
        rewards = np.asarray(scores, dtype=np.float32)
        adv = group_advantages(rewards.tolist(), G).numpy()
        # 4. train step
        samples = [Sample(list(p), g.token_ids, float(a), g.logprobs) for p, g, a in zip(prompt_ids, gens, adv)]
        trainer_lp, losses, norms = w.train_step(it, samples)
        self._maybe_flip(w, it, "after_step")
        t_train = time.perf_counter()
        # 5. weights after the step
        weights = w.weight_hashes(it)
        t_hash = time.perf_counter()
        times = {
            "sync_s": t_sync - t0,  # the eval is timed apart (eval_s)
            "sync_export_s": sync_parts["export_s"],
            "sync_load_s": sync_parts["load_s"],
            "rollout_s": t_roll - t_eval,
            "train_s": t_train - t_roll,
            "hash_s": t_hash - t_train,
            "step_s": time.perf_counter() - t0,
        }
        return records.StepData(
            it, batch.prompt_ids, gens, rewards, adv, trainer_lp, losses, norms, sent, weights, times, evaluation
        )

    def evaluate(self, w: Workers, it: int) -> dict[str, Any]:
        """Greedy decoding of the held-out prompts by the policy entering iteration `it` (scheduled as the
        rollout is), scored by the run's reward."""
        assert self.eval_set is not None
        t = time.perf_counter()
        prompts, answers = self.eval_set.prompts, [r["answer"] for r in self.eval_set.rows]
        metas = [dict(r.get("meta") or {}) for r in self.eval_set.rows]
        gens = self.schedule.generate(lambda p, s: w.generate(it, p, s, self.eval_params), prompts, None, it)
        scores = [
            self.reward.score(g.token_ids, a, {**m, "iteration": it, "sample": j, "eval": True})
            for j, (g, a, m) in enumerate(zip(gens, answers, metas))
        ]
        return {
            "tokens": ragged_sha256([g.token_ids for g in gens], np.int64),
            "accuracy": float(np.mean(scores)),
            "prompts": len(gens),
            "eval_s": time.perf_counter() - t,
        }

    def _maybe_flip(self, w: Workers, it: int, when: str) -> None:
        if (p := self.plant.get((it, when))) is not None:
            w.flip_bit(p)


def stop_ids(tokenizer: Any, model_dir: str) -> tuple[int, ...]:
    ids = set()
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(int(i) for i in ids))
