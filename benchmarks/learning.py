"""Does a twice-run learn, and does it reproduce over every iteration? Reads the two ledgers of one
twice-run (A and B) and writes a record and a picture of the learning curve:

- the verdict over all iterations (the long-horizon reproducibility proof);
- mean reward of the first and the last `--window` iterations, and their difference with a bootstrap
  confidence interval over samples (the per-sample rewards of the step data), and over prompt groups
  (GRPO's samples of one prompt are not independent: the group interval is the honest one);
- held-out accuracy (greedy, eval.every) at the first and the last evaluation.

    python benchmarks/learning.py RUNS_DIR --json FILE [--png FILE] [--window 10]

RUNS_DIR holds run_a and run_b (the flow's runs directory, or `detrl reproduce --out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rewards_by_iteration(run_dir: Path, stats: list[dict[str, Any]], samples: int) -> tuple[list[np.ndarray], str]:
    """Each iteration's per-sample rewards, and where they came from: the step data, or, where those were
    not kept (or not copied back from the GPU host), the ledger's counts when every reward is 0 or 1 (the
    mean equals the rewarded fraction): the rewards are then known up to order, enough for the sample
    interval but not the prompt-group one."""
    from detrl.ledger import load_step_data

    out = []
    for it in range(len(stats)):
        arrays = load_step_data(run_dir, it)
        if arrays is not None:
            out.append(np.asarray(arrays["rewards"], np.float64))
            continue
        if out:
            raise SystemExit(f"{run_dir}: iteration {it} has no step data (ledger.keep_step_data=false?)")
        return [_binary(s, samples) for s in stats], "ledger counts (0/1 rewards; no step data)"
    return out, "step data"


def _binary(st: dict[str, Any], samples: int) -> np.ndarray:
    if st.get("mean_reward") != st.get("nonzero_reward_fraction"):
        raise SystemExit("no step data, and rewards other than 0 and 1 need it (ledger.keep_step_data=false?)")
    ones = round(float(st["mean_reward"]) * samples)
    return np.concatenate([np.ones(ones), np.zeros(samples - ones)])


def bootstrap_diff(
    first: np.ndarray, last: np.ndarray, group: int, draws: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """95 % intervals of mean(last) - mean(first), resampling samples, and resampling prompt groups
    (`group` consecutive samples share a prompt)."""
    rng = np.random.default_rng(seed)
    out = {}
    for unit, (a, b) in {
        "samples": (first, last),
        "prompt_groups": (first.reshape(-1, group).mean(1), last.reshape(-1, group).mean(1)),
    }.items():
        ia = rng.integers(0, len(a), size=(draws, len(a)))
        ib = rng.integers(0, len(b), size=(draws, len(b)))
        diffs = b[ib].mean(1) - a[ia].mean(1)
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        out[unit] = {"low": round(float(lo), 4), "high": round(float(hi), 4), "n_first": len(a), "n_last": len(b)}
    return out


def learning_png(stats: list[dict[str, Any]], stats_b: list[dict[str, Any]], title: str, window: int) -> bytes:
    import matplotlib.pyplot as plt

    from detrl.plot import png_bytes  # sets the Agg backend

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=90)
    xs = np.arange(len(stats))
    ra = np.array([s["mean_reward"] for s in stats])
    rb = np.array([s["mean_reward"] for s in stats_b])
    ax1.plot(xs, ra, color="tab:blue", lw=3, alpha=0.45, label="run A, per iteration")
    ax1.plot(xs, rb, color="tab:orange", ls="--", lw=1.2, marker="x", ms=3, label="run B (scheduled differently)")
    if len(ra) >= window:
        roll = np.convolve(ra, np.ones(window) / window, mode="valid")
        ax1.plot(xs[window - 1 :], roll, color="black", lw=1.5, label=f"run A, mean of last {window}")
    ax1.set_title("mean reward of the rollouts", fontsize=10)
    ax1.set_xlabel("iteration")
    ax1.legend(fontsize=7)
    for name, st, style in (("A", stats, {"lw": 3, "alpha": 0.45}), ("B", stats_b, {"ls": "--", "marker": "x"})):
        ev = [(i, s["eval_accuracy"]) for i, s in enumerate(st) if "eval_accuracy" in s]
        if ev:
            ax2.plot(*zip(*ev), label=f"run {name}", **style)  # type: ignore[arg-type]
    ax2.set_title("held-out accuracy (greedy)", fontsize=10)
    ax2.set_xlabel("iteration (policy entering it)")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def summarize(runs_dir: Path, window: int, draws: int) -> tuple[dict[str, Any], bytes]:
    from detrl.ledger import read_ledger
    from detrl.verify import verify

    a, b = runs_dir / "run_a", runs_dir / "run_b"
    verdict = verify(str(a), str(b))
    led_a, led_b = read_ledger(a), read_ledger(b)
    stats = [r["stats"] for r in led_a.iterations]
    stats_b = [r["stats"] for r in led_b.iterations]
    n = len(stats)
    if n < 2 * window:
        raise SystemExit(f"{n} iterations: fewer than two windows of {window}")
    assert led_a.header is not None
    cfg = led_a.header["config"]
    group = int(cfg["rollout"]["samples_per_prompt"])
    samples = int(cfg["rollout"]["prompts_per_step"]) * group
    rewards, source = rewards_by_iteration(a, stats, samples)
    first, last = np.concatenate(rewards[:window]), np.concatenate(rewards[-window:])
    ci = bootstrap_diff(first, last, group, draws)
    if source != "step data":  # sorted rewards carry no prompt groups
        ci["prompt_groups"] = {"low": None, "high": None, "why": "needs the step data"}
    evals = [(i, s["eval_accuracy"]) for i, s in enumerate(stats) if "eval_accuracy" in s]
    record = {
        "runs": str(runs_dir),
        "profile": led_a.header.get("profile"),
        "iterations": n,
        "verdict": verdict.status,
        "first_divergence": verdict.first.where() if verdict.first else None,
        "final_weights": {"A": led_a.completion.get("final_weights") if led_a.completion else None},
        "window": window,
        "mean_reward_first": round(float(first.mean()), 4),
        "mean_reward_last": round(float(last.mean()), 4),
        "mean_reward_diff": round(float(last.mean() - first.mean()), 4),
        "diff_ci95": ci,
        "rewards_from": source,
        "eval": {
            "prompts": cfg.get("eval", {}).get("prompts"),
            "every": cfg.get("eval", {}).get("every"),
            "first": {"iteration": evals[0][0], "accuracy": evals[0][1]} if evals else None,
            "last": {"iteration": evals[-1][0], "accuracy": evals[-1][1]} if evals else None,
            "curve": evals,
        },
        "mean_reward": [round(float(s["mean_reward"]), 4) for s in stats],
        "mean_response_len": [round(float(s.get("mean_response_len", 0.0)), 1) for s in stats],
    }
    title = (
        f"{record['profile']}: {n} iterations, runs A and B {verdict.status}; mean reward "
        f"{record['mean_reward_first']:.3f} (first {window}) -> {record['mean_reward_last']:.3f} (last {window})"
    )
    return record, learning_png(stats, stats_b, title, window)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_dir", type=Path)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--draws", type=int, default=10000)
    a = ap.parse_args()
    record, png = summarize(a.runs_dir, a.window, a.draws)
    a.json.write_text(json.dumps(record, indent=1) + "\n")
    if a.png:
        a.png.write_bytes(png)
    ci = record["diff_ci95"]
    print(
        f"{record['profile']}: {record['iterations']} iterations, {record['verdict']}; mean reward first "
        f"{a.window} {record['mean_reward_first']:.4f}, last {a.window} {record['mean_reward_last']:.4f}, "
        f"diff {record['mean_reward_diff']:+.4f} (95% CI samples [{ci['samples']['low']}, {ci['samples']['high']}], "
        f"prompt groups [{ci['prompt_groups']['low']}, {ci['prompt_groups']['high']}]); held-out accuracy "
        f"{record['eval']['first']} -> {record['eval']['last']}"
    )


if __name__ == "__main__":
    main()
