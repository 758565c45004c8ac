"""Per-iteration curves of two runs as one PNG: reward, loss, response length and the
trainer-vs-rollout log-prob difference, run A over run B (B dashed with crosses, so identical runs show
one line drawn twice). A red line marks the iteration where the runs first part, named with its phase:
the curves of the two runs can lie on top of each other even then (a flipped bit moves no mean)."""

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
    ("eval_accuracy", "held-out accuracy (greedy, eval.every)"),
)


def curves_png(
    runs: Mapping[str, Sequence[dict[str, Any]]], title: str = "", diverged_at: tuple[int, str] | None = None
) -> bytes:
    """`diverged_at`: (iteration, phase) of the first divergence, marked in every panel."""
    fig, axes = plt.subplots(2, 4, figsize=(15, 6), dpi=80)
    axes.flat[-1].axis("off")
    styles = {
        "A": {"color": "tab:blue", "lw": 3, "alpha": 0.6, "marker": "o"},
        "B": {"color": "tab:orange", "ls": "--", "lw": 1.5, "marker": "x"},
    }
    for ax, (key, label) in zip(axes.flat, PANELS):
        for name, stats in runs.items():
            ys = [s.get(key) for s in stats]
            xs = [i for i, y in enumerate(ys) if isinstance(y, (int, float))]
            ax.plot(xs, [ys[i] for i in xs], label=f"run {name}", **styles.get(name, {"marker": "o"}))
        if diverged_at is not None:
            ax.axvline(diverged_at[0], color="tab:red", lw=1.2, label=f"first divergence: {diverged_at[1]}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return png_bytes(fig)


def png_bytes(fig: Any) -> bytes:
    """A finished figure as PNG bytes; the figure is closed."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
