"""The deterministic GRPO loop. Per iteration: sync the policy to the engine and prove it holds the
trainer's weights -> pick prompts -> roll out -> rewards -> advantages -> train step -> record
every phase's hash in the ledger."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__
from .config import ConfigError, RunConfig, semantic_part
from .convert import ArchMeta, ConvertedArtifact, check_tensor_parallel, convert_cached
from .data import DatasetArtifact, PromptSet, fetch_dataset, read_dataset, reward_fn, sample_seed
from .determinism import DeterminismError, fingerprint
from .grpo import group_advantages
from .ledger import (LEDGER_FILE, LEDGER_VERSION, LedgerWriter, array_sha256, combine, ragged,
                     ragged_sha256, read_ledger, save_step_data)
from .models import ModelArtifact, fetch_model
from .rundir import check_out_dir, resume_mismatch
from .rollout import Generation, SamplingParams
from .trainer import Perturbation, Sample
from .util import atomic_write_text


class RunError(RuntimeError):
    pass


class WeightSyncError(RunError):
    """The engine does not hold exactly the weights the trainer sent."""


@dataclass
class Artifacts:
    model: ModelArtifact
    data: DatasetArtifact
    megatron: ConvertedArtifact


@dataclass
class RunSummary:
    run_dir: str
    iterations: int
    wall_s: float
    final_weights: str
    stats: list[dict[str, Any]] = field(default_factory=list)


def prepare(cfg: RunConfig, cache_dir: str | Path, *, refresh: bool = False) -> Artifacts:
    """Download (or generate) the model and dataset and convert the model; each step cached, each
    cache entry checked against its recorded hash (`refresh`: rebuilt instead)."""
    model = fetch_model(cfg.model, cache_dir, device="cuda" if cfg.on_gpu else "cpu", refresh=refresh)
    data = fetch_dataset(cfg.data, cache_dir, refresh=refresh)
    return Artifacts(model, data, convert_cached(model, cache_dir, refresh=refresh))


def _stop_ids(tokenizer: Any, model_dir: str) -> tuple[int, ...]:
    ids = set()
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(int(i) for i in ids))


def _shard(samples: list[Sample], updates: int, ranks: int) -> list[list[Sample]]:
    """Rank r gets the r-th contiguous slice of every mini-batch."""
    per_update = len(samples) // updates
    k = per_update // ranks
    return [[s for u in range(updates) for s in samples[u * per_update + r * k: u * per_update + (r + 1) * k]]
            for r in range(ranks)]


def _unshard(parts: Sequence[Sequence[Any]], updates: int) -> list[Any]:
    k = len(parts[0]) // updates
    return [x for u in range(updates) for part in parts for x in part[u * k:(u + 1) * k]]


CKPT_DIR = "checkpoints"


@dataclass
class Checkpoint:
    iteration: int          # the last iteration whose record precedes the checkpoint
    path: Path
    ledger_bytes: int       # the ledger's size right after that record


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    from .convert import checkpoint_complete

    for d in sorted((run_dir / CKPT_DIR).glob("iter_*"), reverse=True):
        meta = d / "meta.json"
        if meta.exists() and (d / "optimizer_tp0.pt").exists() and checkpoint_complete(d / "weights"):
            m = json.loads(meta.read_text())
            return Checkpoint(m["iteration"], d, m["ledger_bytes"])
    return None


def _save_checkpoint(w: Any, run_dir: Path, it: int, cfg: RunConfig) -> None:
    """All trainer ranks write into a temp directory that is renamed into place when complete."""
    from .util import atomic_dir

    final = run_dir / CKPT_DIR / f"iter_{it:05d}"
    with atomic_dir(final) as tmp:
        w.wait([t.save_checkpoint.remote(str(tmp)) for t in w.trainers], "checkpoint", it)
        (tmp / "meta.json").write_text(json.dumps({
            "iteration": it, "ledger_bytes": (run_dir / LEDGER_FILE).stat().st_size,
            "config_hash": cfg.config_hash(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    for old in sorted((run_dir / CKPT_DIR).glob("iter_*"))[:-cfg.checkpoint.keep]:
        shutil.rmtree(old, ignore_errors=True)


def _resume_point(cfg: RunConfig, run_dir: Path, resume: bool,
                  restart: bool = False) -> tuple[int, Checkpoint | None, Any]:
    """(first iteration to run, checkpoint to load, the existing ledger when complete)."""
    if not resume:
        check_out_dir(run_dir)
    if not (run_dir / LEDGER_FILE).exists():
        return 0, None, None
    if (why := resume_mismatch(run_dir, cfg)) is not None:
        raise ConfigError(why)
    existing = read_ledger(run_dir)
    if existing.complete:
        return cfg.train.steps, None, existing
    for half in (run_dir / CKPT_DIR).glob(".iter_*"):  # a kill during a save leaves its temp dir
        shutil.rmtree(half, ignore_errors=True)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        if not restart:
            raise ConfigError(
                f"{run_dir} has {len(existing.iterations)} recorded iteration(s) but no checkpoint to resume "
                "from (checkpoint.every was 0 or the run stopped before its first save); the ledger is kept. "
                "Rerun into a new --out, and set checkpoint.every=K from the start to make a run resumable")
        # a Prefect retry owns its run directory: nothing to continue from, so start over in place
        (run_dir / LEDGER_FILE).unlink()
        shutil.rmtree(run_dir / "steps", ignore_errors=True)
        return 0, None, None
    return ckpt.iteration + 1, ckpt, None


def run(cfg: RunConfig, run_dir: str | Path, artifacts: Artifacts, *, resume: bool = False,
        restart_without_checkpoint: bool = False,
        perturbations: Sequence[Perturbation] = (),
        progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> RunSummary:
    """Run the loop once into `run_dir` (ledger.jsonl, fingerprint.json, config.json, steps/,
    checkpoints/). `resume`: continue an interrupted run from its last checkpoint; the ledger it
    writes is identical, record for record, to one of a run that never stopped."""
    import ray
    from transformers import AutoTokenizer

    from .workers import Workers

    tp = cfg.resources.tensor_parallel
    check_tensor_parallel(ArchMeta.from_hf_dir(artifacts.model.path), tp)
    run_dir = Path(run_dir)
    start, ckpt, done = _resume_point(cfg, run_dir, resume, restart_without_checkpoint)
    if done is not None:
        return RunSummary(str(run_dir), len(done.iterations), 0.0, done.completion.get("final_weights", ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(artifacts.model.path)
    prompts = PromptSet(read_dataset(artifacts.data), tokenizer, cfg.data, cfg.seed)
    reward = reward_fn(cfg.reward, tokenizer)
    params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                            _stop_ids(tokenizer, artifacts.model.path))
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
    updates = cfg.train.updates_per_step
    plant = {(p.iteration, p.when): p for p in perturbations}

    with Workers(cfg, artifacts.model.path, str(Path(artifacts.megatron.path) / "weights")) as w:
        engine_dtype = w.engine_info["dtype"]
        selftest = None
        if cfg.determinism.enabled and cfg.determinism.selftest:
            selftest = w.wait(w.rollout.selftest.remote(True), "engine self-test")
            if not selftest["passed"]:
                raise DeterminismError(
                    f"the rollout engine is not batch-invariant ({selftest['unique']}: more than one unique "
                    f"sample per mode): {w.engine_info}. Use a deterministic setting (sglang: "
                    f"enable_deterministic_inference with flashinfer or triton; hf: batching=per_sequence)")
        header = {
            "kind": "header", "version": LEDGER_VERSION, "run_id": uuid.uuid4().hex, "detrl": __version__,
            "profile": cfg.profile, "config": cfg.recorded_dict(), "config_hash": cfg.config_hash(),
            "artifacts": {"model": asdict(artifacts.model), "data": asdict(artifacts.data),
                          "megatron": asdict(artifacts.megatron)},
            "engine": w.engine_info, "selftest": selftest, "prompts_available": len(prompts), "prompts_dropped": prompts.dropped,
            "fingerprints": {"driver": fingerprint("driver"), **w.fingerprints},
            "placement": w.placement,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if ckpt is None:
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=1, sort_keys=True))
            atomic_write_text(run_dir / "fingerprint.json", json.dumps(header["fingerprints"], indent=1, sort_keys=True))
        summary = RunSummary(str(run_dir), start, 0.0, "")
        if ckpt is not None:
            w.wait([t.load_checkpoint.remote(str(ckpt.path)) for t in w.trainers], "checkpoint load")
            for f in (run_dir / "steps").glob("iter_*.safetensors"):
                if int(f.stem.split("_")[1]) > ckpt.iteration:
                    f.unlink()
            with open(run_dir / "resumes.jsonl", "a") as f:
                f.write(json.dumps({"resumed_at": header["started_at"], "from_checkpoint": ckpt.iteration,
                                    "fingerprints": header["fingerprints"]}) + "\n")
        with LedgerWriter(run_dir / LEDGER_FILE, truncate_to=ckpt.ledger_bytes if ckpt else None) as ledger:
            if ckpt is None:
                ledger.append(header)
            record: dict[str, Any] = {}
            for it in range(start, cfg.train.steps):
                t0 = time.perf_counter()
                if (p := plant.get((it, "before_step"))) is not None:
                    ray.get([t.flip_bit.remote(p.tensor, p.index, p.bit) for t in w.trainers])

                # 1. policy sync: the engine must hold exactly the trainer's weights
                exports = [t.export_hf.options(num_returns=2).remote(engine_dtype) for t in w.trainers[:tp]]
                tensors_ref, sent_ref = exports[0]
                # iteration 0: the engine loaded the same checkpoint from disk; proving it checks the conversion
                update = it > 0 or (0, "before_step") in plant
                bad = w.wait(w.rollout.sync.remote(tensors_ref, update), "weight sync", it)
                sent = w.wait(sent_ref, "weight sync", it)
                w.wait([ref for pair in exports[1:] for ref in pair], "weight sync", it)
                if bad:
                    raise WeightSyncError(f"iteration {it}: the engine's weights differ from the trainer's in "
                                          f"{len(bad)} tensor(s): {bad[:5]}")
                del tensors_ref
                t_sync = time.perf_counter()

                # 2. prompts and rollout
                batch = prompts.batch(it, P)
                prompt_ids = [p for p in batch.prompt_ids for _ in range(G)]
                answers = [a for a in batch.answers for _ in range(G)]
                seeds = ([sample_seed(cfg.sampling_seed, it, j, P * G) for j in range(P * G)]
                         if cfg.pins_seeds else None)
                gens: list[Generation] = w.wait(w.rollout.generate.remote(prompt_ids, seeds, params), "rollout", it)
                t_roll = time.perf_counter()

                # 3. rewards and group-normalized advantages
                rewards = np.asarray([reward(g.token_ids, a) for g, a in zip(gens, answers)], dtype=np.float32)
                adv = group_advantages(rewards.tolist(), G).numpy()

                # 4. train step. Rank = dp_rank * tp + tp_rank: every TP rank of a data-parallel
                # replica gets its shard, and the first one reports for the replica.
                samples = [Sample(list(p), g.token_ids, float(a)) for p, g, a in zip(prompt_ids, gens, adv)]
                per_update = len(samples) // updates
                global_tokens = [sum(len(s.response_ids) for s in samples[u * per_update:(u + 1) * per_update])
                                 for u in range(updates)]
                shards = _shard(samples, updates, cfg.data_parallel)
                results = w.wait([t.train_step.remote(shards[r // tp], global_tokens)
                                  for r, t in enumerate(w.trainers)], "train", it)[::tp]
                trainer_lp = _unshard([r.logprobs for r in results], updates)
                losses, norms = results[0].losses, results[0].grad_norms
                if (p := plant.get((it, "after_step"))) is not None:
                    ray.get([t.flip_bit.remote(p.tensor, p.index, p.bit) for t in w.trainers])
                t_train = time.perf_counter()

                # 5. weights after the step (every data-parallel replica must hold the same)
                rank_hashes = w.wait([t.weight_hashes.remote() for t in w.trainers], "weight hash", it)[::tp]
                for d, h in enumerate(rank_hashes[1:], 1):
                    if h != rank_hashes[0]:
                        diff = sorted(n for n in h if h[n] != rank_hashes[0].get(n))
                        raise RunError(f"iteration {it}: data-parallel replica {d} (trainer rank {d * tp}) "
                                       f"weights differ from replica 0 in {diff[:5]}")
                weights = rank_hashes[0]
                t_hash = time.perf_counter()

                rollout_lp = [np.asarray(g.logprobs, dtype=np.float32) for g in gens]
                record = {
                    "kind": "iteration", "iteration": it,
                    "hashes": {
                        "policy_weights": combine(sent),
                        "prompts": ragged_sha256(batch.prompt_ids, np.int64),
                        "rollout_tokens": ragged_sha256([g.token_ids for g in gens], np.int64),
                        "rollout_logprobs": ragged_sha256(rollout_lp, np.float32),
                        "rewards": array_sha256(rewards),
                        "advantages": array_sha256(adv.astype(np.float32)),
                        "trainer_logprobs": ragged_sha256(trainer_lp, np.float32),
                        "loss": array_sha256(np.asarray(losses, dtype=np.float64)),
                        "grad_norm": array_sha256(np.asarray(norms, dtype=np.float64)),
                        "weights": combine(weights),
                    },
                    "tensors": {"policy_weights": [[n, sent[n]] for n in sent],
                                "weights": [[n, weights[n]] for n in weights]},
                    "stats": {
                        **rollout_shape(gens, rewards), "loss": float(np.mean(losses)),
                        "grad_norm": float(np.mean(norms)),
                        "logprob_max_abs_diff": float(max(
                            (np.abs(a - b).max() for a, b in zip(rollout_lp, trainer_lp) if len(a)), default=0.0)),
                        "sync_s": t_sync - t0, "rollout_s": t_roll - t_sync, "train_s": t_train - t_roll,
                        "hash_s": t_hash - t_train, "step_s": time.perf_counter() - t0,
                    },
                }
                if cfg.ledger.keep_step_data:
                    save_step_data(run_dir, it, _step_arrays(batch.prompt_ids, gens, rollout_lp, rewards, adv,
                                                             trainer_lp, losses, norms))
                ledger.append(record)
                every = cfg.checkpoint.every
                if every and (it + 1) % every == 0 and it + 1 < cfg.train.steps:
                    _save_checkpoint(w, run_dir, it, cfg)
                summary.stats.append(record["stats"])
                summary.iterations = it + 1
                if progress is not None:
                    progress(it, cfg.train.steps, record["stats"])
            summary.final_weights = record["hashes"]["weights"] if record else ""
            summary.wall_s = time.perf_counter() - t_start
            ledger.append({"kind": "complete", "iterations": cfg.train.steps, "final_weights": summary.final_weights,
                           "wall_s": summary.wall_s,
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return summary


def rollout_shape(gens: Sequence[Generation], rewards: np.ndarray) -> dict[str, float]:
    """How the rollout looked: response lengths, how many ended at EOS (so the decode batch shrank)
    rather than at max_new_tokens, and how many samples the reward paid."""
    lengths = np.asarray([len(g.token_ids) for g in gens])
    return {"mean_reward": float(rewards.mean()), "nonzero_reward_fraction": float(np.mean(rewards != 0)),
            "mean_response_len": float(lengths.mean()), "response_len_min": int(lengths.min()),
            "response_len_median": float(np.median(lengths)), "response_len_max": int(lengths.max()),
            "eos_fraction": float(np.mean([g.finish_reason == "stop" for g in gens]))}


def progress_line(stats: dict[str, Any]) -> str:
    return (f"reward {stats['mean_reward']:.3f} (rewarded {stats['nonzero_reward_fraction']:.0%}) "
            f"loss {stats['loss']:+.6f} grad-norm {stats['grad_norm']:.4f} "
            f"len {stats['response_len_min']}/{stats['response_len_median']:.0f}/"
            f"{stats['response_len_max']} EOS {stats['eos_fraction']:.0%} "
            f"|lp trainer-rollout| {stats['logprob_max_abs_diff']:.2e} step {stats['step_s']:.2f}s")


def _step_arrays(prompt_ids, gens, rollout_lp, rewards, adv, trainer_lp, losses, norms) -> dict[str, np.ndarray]:
    p_flat, p_len = ragged(prompt_ids, np.int64)
    t_flat, t_len = ragged([g.token_ids for g in gens], np.int64)
    return {
        "prompts": p_flat, "prompts_len": p_len,
        "rollout_tokens": t_flat, "rollout_tokens_len": t_len,
        "rollout_logprobs": ragged(rollout_lp, np.float32)[0],
        "rewards": rewards.astype(np.float32), "advantages": adv.astype(np.float32),
        "trainer_logprobs": ragged(trainer_lp, np.float32)[0],
        "loss": np.asarray(losses, dtype=np.float64), "grad_norm": np.asarray(norms, dtype=np.float64),
    }
