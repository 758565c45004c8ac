"""How a verdict reads: text for the terminal and CI logs, markdown for Prefect's UI, a JSON summary
for alerts, and the artifacts the flow publishes (verdict, plot, phase table, curves)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .ledger import PHASES, read_ledger
from .plot import curves_png, data_uri
from .verify import HEAD, SHAPE_KEYS, Verdict


def shape_lines(v: Verdict) -> list[str]:
    """One line per run and iteration: lengths min/median/max, EOS-ended, reward, |lp diff|."""
    lines = []
    for run, rows in v.shape.items():
        for i, r in enumerate(rows):
            if any(k not in r for k in SHAPE_KEYS if k != "logprob_mismatched_tokens"):
                continue  # (ledgers from before the mismatch count have the rest)
            count = r.get("logprob_mismatched_tokens")
            lines.append(
                f"run {run} iteration {i}: response length {r['response_len_min']:.0f}/"
                f"{r['response_len_median']:.0f}/{r['response_len_max']:.0f} (min/median/max), "
                f"ended by EOS {r['eos_fraction']:.0%}, mean reward {r['mean_reward']:.3f}, "
                f"rewarded {r['nonzero_reward_fraction']:.0%}, trainer-vs-rollout logprob "
                f"max|diff| {r['logprob_max_abs_diff']:.3g}" + ("" if count is None else f", {count:.0f} tokens differ")
            )
    return lines


def context_lines(ctx: dict[str, Any] | None) -> list[str]:
    if not ctx:
        return []
    rel = ctx["position"] - ctx["from"]
    out = [
        f"{ctx['phase']} first differ at sample {ctx['sample']}, token position {ctx['position']} "
        "(the differing token in brackets):"
    ]
    for run in ("a", "b"):
        toks = ctx.get(f"{run}_text") or [str(t) for t in ctx[run]]
        shown = [repr(t) if i != rel else f"[{t!r}]" for i, t in enumerate(toks)]
        value = f" ({ctx['phase']} there: {ctx[run + '_value']!r})" if f"{run}_value" in ctx else ""
        out.append(f"run {run.upper()} tokens {ctx['from']}..: {' '.join(shown)}{value}")
    return out


def verdict_summary(v: Verdict) -> dict[str, Any]:
    """The few fields an alert or a CI log needs, as plain JSON."""
    first = None
    if v.first is not None:
        first = f"{v.first.where()}: {v.first.detail}"
        if v.first.tensors:
            first += f" (first tensor {v.first.tensors[0]})"
    return {
        "status": v.status,
        "exit_code": v.exit_code,
        "iterations": list(v.iterations),
        "first": first,
        "likely_cause": v.likely_cause,
        "problems": v.problems[:3],
        "semantic_config_diff": v.config_diff[:8],
        "artifact_diff": v.artifact_diff[:8],
        "environment_diff": v.fingerprint_diff[:8],
        "context": context_lines(v.first.context if v.first else None),
        "schedule": v.schedule,
    }


def schedule_lines(v: Verdict) -> list[str]:
    """How each run sent its requests, and what an IDENTICAL verdict therefore certifies."""
    a, b = v.schedule.get("A"), v.schedule.get("B")
    if a is None or b is None:
        return []
    if a == b:
        what = (
            "identical records prove repeatability under one schedule, not batch invariance"
            if v.status == "identical"
            else "both runs saw the same batches"
        )
        return [f"schedule: runs A and B sent their requests the same way ({a}): {what}"]
    lines = [f"schedule: run A {a}; run B {b}"]
    if v.status == "identical":
        lines.append("the same records from differently batched requests: the engine is batch-invariant here")
    return lines


def _divergence_lines(v: Verdict) -> list[str]:
    d = v.first
    if d is None:
        return []
    if d.iteration is None:  # every hash matched: the runs are not one experiment
        lines = [f"not comparable ({d.phase}): {d.detail}"]
        return lines + ([f"likely cause: {v.likely_cause}"] if v.likely_cause else [])
    lines = [f"first divergence: iteration {d.iteration}, phase {d.phase}: {d.detail}"]
    if d.tensors:
        shown = ", ".join(d.tensors[:8]) + (f" (+{len(d.tensors) - 8} more)" if len(d.tensors) > 8 else "")
        lines.append(f"tensors that differ: {shown}")
    lines += context_lines(d.context)
    if d.other_phases:
        lines.append(f"also differing in that iteration: {', '.join(d.other_phases)}")
    if v.likely_cause:
        lines.append(f"likely cause: {v.likely_cause}")
    return lines


def _head(v: Verdict) -> str:
    if v.status == "identical" and v.config_diff_other:
        keys = ", ".join(d.split(": ", 1)[0] for d in v.config_diff_other)
        return f"IDENTICAL (configs differ only in non-semantic keys: {keys})"
    return HEAD[v.status]


def _difference_lines(v: Verdict) -> list[tuple[str, list[str]]]:
    """(title, lines) of what differs besides the hashes, semantic first."""
    return [
        (t, d)
        for t, d in (
            ("Artifact differences", v.artifact_diff),
            ("Semantic config differences", v.config_diff),
            ("Non-semantic config differences (cannot change results)", v.config_diff_other),
            ("Environment differences", v.fingerprint_diff),
        )
        if d
    ]


def format_text(v: Verdict) -> str:
    lines = [f"{_head(v)}: {v.a} vs {v.b} ({v.iterations[0]} and {v.iterations[1]} iterations)"]
    if v.status == "identical":
        lines.append(f"all {v.iterations[0]} iterations match in every phase ({', '.join(PHASES)})")
    lines += [f"problem: {p}" for p in v.problems]
    if v.status == "identical":  # what the match certifies, next to it
        lines += schedule_lines(v)
    early = 2 if v.status in ("diverged", "different_experiments") else 0  # what makes them differ, first
    for title, diff in _difference_lines(v)[:early]:
        lines.append(f"{title.lower()}: " + "; ".join(diff[:8]))
    lines += _divergence_lines(v)
    for title, diff in _difference_lines(v)[early:]:
        lines.append(f"{title.lower()}: " + "; ".join(diff[:8]))
    if v.status != "identical":
        lines += schedule_lines(v)
    shape = shape_lines(v)
    if shape:
        lines += ["rollout shape:"] + [f"  {x}" for x in shape]
    return "\n".join(lines)


def format_markdown(v: Verdict) -> str:
    # no emoji or block glyphs: a browser without those fonts shows boxes (seen in Prefect's UI)
    out = [f"# Reproducibility verdict: **{_head(v)}**", ""]
    out.append(f"- run A: `{v.a}` ({v.iterations[0]} iterations)")
    out.append(f"- run B: `{v.b}` ({v.iterations[1]} iterations)")
    out.append("")
    if v.status == "identical":
        out.append(f"Every phase of every iteration matched bit for bit: {', '.join(PHASES)}.")
    for p in v.problems:
        out.append(f"- **problem:** {p}")
    out += [f"- {line}" for line in schedule_lines(v)]
    if v.first is not None:
        out += ["", "## First divergence" if v.first.iteration is not None else "## Why not comparable", ""]
        out += [f"- {line}" for line in _divergence_lines(v)]
    for title, diff in _difference_lines(v):
        out += ["", f"## {title}", ""] + [f"- `{d}`" for d in diff[:20]]
    shape = shape_lines(v)
    if shape:
        out += ["", "## Rollout shape", ""] + [f"- {x}" for x in shape]
    return "\n".join(out) + "\n"


@dataclass
class FlowArtifacts:
    markdown: str  # the verdict with the plot embedded
    plot: str  # the plot as a data: URI
    phases: list[dict[str, str]]  # iteration x phase: match or DIFF
    curves: list[dict[str, Any]]  # per run and iteration: loss, reward, lengths, step time


def flow_artifacts(v: Verdict) -> FlowArtifacts:
    """What the flow publishes for a verdict. Prefect 3.8's UI renders both an image artifact and a
    markdown image from a data: URI (checked in headless Chromium, scripts/ui_screenshots.py); the PNG
    is about 40 kB. Ledger paths are plain text: a file:// link to the worker's disk is dead in a browser."""
    stats = {k: [it["stats"] for it in read_ledger(d).iterations] for k, d in (("A", v.a), ("B", v.b))}
    at = (v.first.iteration, v.first.phase) if v.first is not None and v.first.iteration is not None else None
    title = f"run A vs run B: {v.status}" + (f" (first divergence: iteration {at[0]}, {at[1]})" if at else "")
    plot = data_uri(curves_png(stats, title, at))
    markdown = format_markdown(v) + f"\n## Per iteration\n\n![reward, loss, length, logprob diff]({plot})\n"
    phases = [{"iteration": r["iteration"], **{p: r[p] for p in PHASES}} for r in v.table]
    metrics = ("loss", "grad_norm", *SHAPE_KEYS, "eval_accuracy", "step_s")
    curves = [
        {"run": k, "iteration": i, **{m: round(s[m], 6) for m in metrics if m in s}}
        for k, rows in stats.items()
        for i, s in enumerate(rows)
    ]
    return FlowArtifacts(markdown, plot, phases, curves)
