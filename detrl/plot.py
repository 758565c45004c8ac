"""Per-iteration curves of two runs as one PNG: reward, loss, response length and the
trainer-vs-rollout log-prob difference, run A over run B (B dashed, so identical runs show one line
drawn twice)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on workers and CI
import matplotlib.pyplot as plt

PANELS = (
    ("mean_reward", "mean reward"),
    ("loss", "loss"),
    ("mean_response_len", "mean response length (tokens)"),
    ("logprob_max_abs_diff", "trainer vs rollout log-prob max |diff|"),
    ("logprob_mismatched_tokens", "tokens whose trainer and rollout log-probs differ"),
    ("eos_fraction", "responses ended by EOS"),
)


def curves_png(runs: Mapping[str, Sequence[dict[str, Any]]], title: str = "") -> bytes:
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), dpi=80)
    styles = {"A": {"color": "tab:blue", "lw": 3, "alpha": 0.6}, "B": {"color": "tab:orange", "ls": "--", "lw": 1.5}}
    for ax, (key, label) in zip(axes.flat, PANELS):
        for name, stats in runs.items():
            ys = [s.get(key) for s in stats]
            xs = [i for i, y in enumerate(ys) if isinstance(y, (int, float))]
            ax.plot(xs, [ys[i] for i in xs], marker="o", label=f"run {name}", **styles.get(name, {}))
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
