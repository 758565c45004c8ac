"""Scaling figures for issue 6, each set measured in one invocation.

--mode trainer: the Megatron trainer alone on fixed samples of the run's batch shape, per layout
(DPxTP) and NCCL algorithm (NCCL_ALGO=Ring, as det-rl runs, against NCCL's own choice). Per iteration:
train step, weight hashing, export of the policy. The final weight hashes say which runs agree bit for bit.

--mode loop: the whole loop (sync, rollout, rewards, train, hashes) once per layout, e.g. 1 GPU
against 2; per-iteration stats from the ledger.

    python benchmarks/scaling.py --mode trainer --layouts 1x1,2x1,1x2 --json OUT.json
    python benchmarks/scaling.py --mode loop --layouts 1x1,2x1 --json OUT.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _layouts(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",")]  # type: ignore[misc]


def _samples(n: int, prompt: int, response: int, vocab: int, seed: int = 0):
    import torch

    from detrl.trainer import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(0, vocab, (prompt + i % 40,), generator=g).tolist()
        r = torch.randint(0, vocab, (response - i % 16,), generator=g).tolist()
        out.append(Sample(p, r, 1.0 if i % 2 else -1.0))
    return out


def layout_config(profile: str, overrides: list[str], dp: int, tp: int):
    from detrl.config import load_config

    base = load_config(profile, overrides=overrides)
    gpus = max(base.resources.num_gpus, dp * tp) if base.on_gpu else 0
    return load_config(
        profile,
        overrides=[
            *overrides,
            f"resources.num_gpus={gpus}",
            f"resources.trainer_ranks={dp * tp}",
            f"resources.tensor_parallel={tp}",
            "train.on_policy=approx",  # every row in one mode: exact needs tensor_parallel=1
        ],
    )


def trainer_layout(cfg, arts, dp: int, tp: int, algo: str, samples, steps: int) -> dict:
    """Trainer actors only, with the run's runtime_env; NCCL_ALGO removed for algo='default'."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from detrl.ray.env import runtime_env
    from detrl.ray.group import shard
    from detrl.ray.trainer_actor import TrainerActor

    env = runtime_env(cfg, "trainer")
    if algo == "default":
        env["env_vars"].pop("NCCL_ALGO", None)
    world, gpu = dp * tp, cfg.on_gpu
    pg = placement_group([{"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}] * world, strategy="PACK")
    ray.get(pg.ready(), timeout=600)
    cls = ray.remote(TrainerActor)
    ckpt = str(Path(arts.megatron.path) / "weights")
    actors = [
        cls.options(
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else 1,
            runtime_env=env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        ).remote(json.dumps(cfg.model_dump(mode="json")), arts.model.path, ckpt, r, world)
        for r in range(world)
    ]
    try:
        t = time.perf_counter()
        addr, port = ray.get(actors[0].rendezvous.remote())
        ray.get([a.setup.remote(addr, port) for a in actors])
        setup_s = time.perf_counter() - t
        algos = {e["env"].get("NCCL_ALGO") for e in ray.get([a.env.remote() for a in actors])}
        shards = shard(list(samples), 1, dp)
        tokens = [sum(len(s.response_ids) for s in samples)]
        rows = []
        for _ in range(steps):
            t0 = time.perf_counter()
            res = ray.get([a.train_step.remote(shards[r // tp], tokens) for r, a in enumerate(actors)])
            t1 = time.perf_counter()
            hashes = [h for h in ray.get([a.weight_hashes.remote() for a in actors]) if h is not None]
            t2 = time.perf_counter()
            exports = [a.export_hf.options(num_returns=2).remote("bfloat16") for a in actors[:tp]]
            ray.get([ref for pair in exports for ref in pair])
            t3 = time.perf_counter()
            rows.append(
                {
                    "train_s": t1 - t0,
                    "hash_s": t2 - t1,
                    "export_s": t3 - t2,
                    "loss": res[0].losses[0],
                    "replicas_agree": all(h == hashes[0] for h in hashes),
                }
            )
        from detrl.ledger import combine

        return {
            "layout": f"{dp}x{tp}",
            "dp": dp,
            "tp": tp,
            "algo": algo,
            "nccl_algo_in_workers": sorted(map(str, algos)),
            "setup_s": setup_s,
            "iterations": rows,
            "final_weights": combine(hashes[0]),
            "train_s_mean_after_first": statistics.mean(r["train_s"] for r in rows[1:])
            if steps > 1
            else rows[0]["train_s"],
        }
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["trainer", "loop"], required=True)
    ap.add_argument("--profile", default="gsm8k-qwen2.5-0.5b-smoke")
    ap.add_argument("--layouts", default="1x1,2x1,1x2", help="DPxTP, comma separated")
    ap.add_argument("--algos", default="Ring,default", help="trainer mode: NCCL algorithms for multi-rank layouts")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cache", default="/tmp/detrl-cache")
    ap.add_argument("--out", default="/tmp/detrl-scaling")
    ap.add_argument("--json", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    import ray

    from detrl.config import load_config
    from detrl.determinism import fingerprint
    from detrl.loop import prepare, run
    from detrl.megatron.names import ArchMeta

    base = [f"train.steps={a.steps}", *a.overrides]
    cfg = load_config(a.profile, overrides=base)
    arts = prepare(cfg, a.cache)
    record = {
        "mode": a.mode,
        "profile": a.profile,
        "overrides": a.overrides,
        "device": fingerprint("driver"),
        "results": [],
    }
    if a.mode == "trainer":
        ray.init(include_dashboard=False, logging_level="WARNING")
        n = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
        samples = _samples(n, 120, cfg.rollout.max_new_tokens, ArchMeta.from_hf_dir(arts.model.path).vocab_size)
        record["batch"] = {"samples": n, "response_tokens": sum(len(s.response_ids) for s in samples)}
        for dp, tp in _layouts(a.layouts):
            for algo in a.algos.split(",") if dp * tp > 1 else ["Ring"]:
                r = trainer_layout(layout_config(a.profile, base, dp, tp), arts, dp, tp, algo, samples, a.steps)
                record["results"].append(r)
                print(
                    json.dumps(
                        {
                            k: r[k]
                            for k in (
                                "layout",
                                "algo",
                                "nccl_algo_in_workers",
                                "setup_s",
                                "train_s_mean_after_first",
                                "final_weights",
                            )
                        }
                    ),
                    flush=True,
                )
        base = record["results"][0]["train_s_mean_after_first"]
        for r in record["results"]:
            r["train_speedup_vs_first"] = base / r["train_s_mean_after_first"]
        ring = {r["layout"]: r for r in record["results"] if r["algo"] == "Ring"}
        record["ring_over_default"] = {
            r["layout"]: {
                "train_s_ratio": ring[r["layout"]]["train_s_mean_after_first"] / r["train_s_mean_after_first"],
                "same_weights": ring[r["layout"]]["final_weights"] == r["final_weights"],
            }
            for r in record["results"]
            if r["algo"] == "default" and r["layout"] in ring
        }
        ray.shutdown()
    else:
        from detrl.ledger import read_ledger

        for dp, tp in _layouts(a.layouts):
            lay = layout_config(a.profile, base, dp, tp)
            out = Path(a.out) / f"{dp}x{tp}"
            t = time.perf_counter()
            run(
                lay,
                out,
                arts,
                progress=lambda it, n, s, dp=dp, tp=tp: print(
                    f"[{dp}x{tp}] {it + 1}/{n} step {s['step_s']:.1f}s = sync {s['sync_s']:.1f} "
                    f"rollout {s['rollout_s']:.1f} train {s['train_s']:.1f} hash {s['hash_s']:.1f}",
                    flush=True,
                ),
            )
            stats = [it["stats"] for it in read_ledger(out).iterations]
            later = stats[1:] or stats
            record["results"].append(
                {
                    "layout": f"{dp}x{tp}",
                    "gpus": dp * tp,
                    "run_wall_s": time.perf_counter() - t,
                    "iterations": stats,
                    "step_s_mean_after_first": statistics.mean(s["step_s"] for s in later),
                    "train_s_mean_after_first": statistics.mean(s["train_s"] for s in later),
                    "final_weights": read_ledger(out).completion.get("final_weights"),
                }
            )
            print(
                json.dumps(
                    {
                        k: record["results"][-1][k]
                        for k in ("layout", "run_wall_s", "step_s_mean_after_first", "train_s_mean_after_first")
                    }
                ),
                flush=True,
            )
        base = record["results"][0]
        for r in record["results"]:
            r["step_speedup_vs_first"] = base["step_s_mean_after_first"] / r["step_s_mean_after_first"]
            r["train_speedup_vs_first"] = base["train_s_mean_after_first"] / r["train_s_mean_after_first"]
    Path(a.json).write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps({k: v for k, v in record.items() if k not in ("device", "results")}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
