"""det-rl's RMSNorm (`det_kernels`) in SGLang's deterministic mode, loaded into its scheduler processes
as an SGLang plugin (entry-point group `sglang.srt.plugins`).

Under batch-invariant mode SGLang 0.5.17 sends every RMSNorm with a residual (two a layer) to
`forward_native`: about a dozen elementwise kernels per norm where batch invariance needs one program
per row (benchmarks/results/h200-det-kernels*.json has the cost). `install` patches that case and the
plain norm (the first layer's input), so that every norm of a Llama/Qwen2 forward is the kernel the
trainer runs in exact on-policy mode; every other case keeps SGLang's code.

For the exact on-policy diagnostic (`benchmarks/onpolicy_diff.py`), `DETRL_SGLANG_DUMP` names a folder
where each scheduler saves the per-op outputs of an extend (prefill) forward, one file a forward, while
the folder holds a file named `ARMED` (`armed`): a whole batch's activations fill a disk in a few forwards.

It is offered per engine, never installed for every SGLang in the environment: `plugin_env` writes a
distribution record naming `install` into a folder and puts the folder first on the path SGLang's
spawned processes inherit; `request` sets what the next engine's processes read. `install` patches only
under `DETRL_SGLANG_KERNELS=1` and reports what it did, one file per process, into the folder
`DETRL_SGLANG_KERNELS_REPORT` names, because SGLang logs a failing plugin and starts without it: the
engine reads the reports and refuses to run on a silent fallback.

The same folder (`path_folder`) holds what `hide` keeps from the rollout process tree: packages it never
uses that SGLang would import at start.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ENABLE_ENV = "DETRL_SGLANG_KERNELS"
REPORT_ENV = "DETRL_SGLANG_KERNELS_REPORT"
PLUGIN_NAME = "detrl_kernels"
PATCHED = ("layernorm.RMSNorm.forward_cuda",)
_DIST = "detrl_sglang_plugin-0.1.dist-info"
PATH_FOLDER_PREFIX = "detrl-sglang-path-"


@functools.cache
def path_folder() -> Path:
    """This process's folder of what det-rl puts first on the path of SGLang's processes (the plugin's
    record, hidden packages), found through `sys.path`; removed at exit. Named with the process id, so
    that one left behind says whose it was."""
    folder = Path(tempfile.mkdtemp(prefix=f"{PATH_FOLDER_PREFIX}{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def plugin_env(folder: str | os.PathLike[str]) -> Path:
    """Write the distribution record that names `install` under `folder`, and put `folder` first on
    `sys.path` (spawned processes start with the parent's) and PYTHONPATH (any other child)."""
    root = Path(folder).resolve()
    dist = root / _DIST
    files = {
        "METADATA": "Metadata-Version: 2.1\nName: detrl-sglang-plugin\nVersion: 0.1\n",
        "entry_points.txt": f"[sglang.srt.plugins]\n{PLUGIN_NAME} = {__name__}:install\n",
    }
    for name, text in files.items():
        _write(dist / name, text)
    _first_on_path(root)
    allowed = os.environ.get("SGLANG_PLUGINS")
    if allowed and PLUGIN_NAME not in allowed.split(","):  # a user's list of plugins would skip ours
        os.environ["SGLANG_PLUGINS"] = f"{allowed},{PLUGIN_NAME}"
    return root


def hide(folder: str | os.PathLike[str], names: tuple[str, ...]) -> Path:
    """Make `import NAME` fail in this process and those it starts, as if NAME were not installed: a
    package of that name that raises ModuleNotFoundError, in `folder`, first on the path. For the
    rollout process tree only, which never uses Megatron, though SGLang imports it when installed: the
    model runner imports SGLang's debug dumper, which imports megatron.core in each scheduler at start."""
    root = Path(folder).resolve()
    for name in names:
        why = f"{name} is hidden from the rollout process tree by det-rl (detrl/rollout/sglang_plugin.py)"
        _write(root / name / "__init__.py", f"raise ModuleNotFoundError({why!r}, name={name!r})\n")
    _first_on_path(root)
    return root


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)


def _first_on_path(root: Path) -> None:
    """First on `sys.path` (spawned processes start with the parent's) and PYTHONPATH (any other child)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(root) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *parts])


def request(enabled: bool) -> Path:
    """Set what the next engine's processes read; returns the folder where each writes its report."""
    folder = tempfile.mkdtemp(prefix="detrl-sglang-plugin-report-")
    os.environ[ENABLE_ENV] = "1" if enabled else "0"
    os.environ[REPORT_ENV] = folder
    return Path(folder)


def read_reports(folder: Path) -> dict[int, dict[str, Any]]:
    """The reports `install` wrote, by process id (and remove them). SGLang loads plugins in the
    engine's own process too: only another process's report says a scheduler was patched."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        out[int(path.stem)] = dict(json.loads(path.read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    return out


def _write_report(report: dict[str, Any]) -> None:
    folder = os.environ.get(REPORT_ENV)
    if folder:
        tmp = Path(folder) / f".{os.getpid()}.tmp"
        tmp.write_text(json.dumps(report))
        tmp.replace(Path(folder) / f"{os.getpid()}.json")


DUMP_ENV = "DETRL_SGLANG_DUMP"
ARMED = "ARMED"


def install() -> None:
    """The plugin's entry point: patch SGLang in this process when the engine asked for it."""
    if os.environ.get(ENABLE_ENV) != "1":
        return
    try:
        import sglang.srt.layers.layernorm as layernorm

        from . import det_kernels

        if not getattr(layernorm.RMSNorm.forward_cuda, "_detrl", False):
            layernorm.RMSNorm.forward_cuda = _rms_norm_forward(layernorm.RMSNorm.forward_cuda, det_kernels)
        if os.environ.get(DUMP_ENV):
            _install_dump(os.environ[DUMP_ENV])
        _write_report({"patched": list(PATCHED)})
    except Exception as e:
        _write_report({"error": f"{type(e).__name__}: {e}"})
        raise


def sglang_native_add_rms_norm(x: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
    """What SGLang computes for a residual RMSNorm under batch-invariant mode without this plugin
    (`forward_native`; enable batch-invariant mode around it): the reference for the tests and benchmark."""
    from types import SimpleNamespace

    from sglang.srt.layers.layernorm import RMSNorm

    norm = SimpleNamespace(
        weight=weight,
        variance_epsilon=eps,
        hidden_size=x.shape[-1],
        variance_size_override=None,
        override_orig_dtype=None,
        fp32_residual=False,
        cast_x_before_out_mul=False,
    )
    out, res = RMSNorm.forward_native(norm, x, residual)
    return out, res


def _rms_norm_forward(original: Any, det_kernels: Any) -> Any:
    from sglang.srt.batch_invariant_ops import is_batch_invariant_mode_enabled
    from sglang.srt.runtime_context import get_exec

    def forward_cuda(self: Any, x: Any, residual: Any = None, post_residual_addition: Any = None) -> Any:
        # The plain and the residual norm under batch-invariant mode; every other case (an extra
        # addition, HF's cast order, fp32 residuals, SGLang's own FSDP-matching on-policy mode) keeps
        # SGLang's code.
        plain = (
            residual is None
            and post_residual_addition is None
            and is_batch_invariant_mode_enabled()
            and get_exec().deterministic.rl_on_policy_target is None
            and not self.cast_x_before_out_mul
            and self.override_orig_dtype is None
            and self.variance_size_override is None
            and x.dim() == 2
            and x.shape[0] > 0
            and x.is_contiguous()
        )
        if plain:
            return det_kernels.rms_norm(x, self.weight.data, self.variance_epsilon)
        if (
            residual is not None
            and post_residual_addition is None
            and is_batch_invariant_mode_enabled()
            and get_exec().deterministic.rl_on_policy_target is None
            and not self.cast_x_before_out_mul
            and not self.fp32_residual
            and self.override_orig_dtype is None
            and self.variance_size_override is None
            and x.dim() == 2
            and x.shape[0] > 0
            and x.shape == residual.shape
            and x.dtype == residual.dtype
            and x.is_contiguous()
            and residual.is_contiguous()
        ):
            return det_kernels.add_rms_norm(x, residual, self.weight.data, self.variance_epsilon)
        return original(self, x, residual, post_residual_addition)

    forward_cuda._detrl = True  # type: ignore[attr-defined]
    return forward_cuda


def _install_dump(folder: str) -> None:
    """Save the per-op outputs (`detrl.onpolicy.op_names`) of every extend forward of the model runner."""
    import torch
    from sglang.srt.model_executor.model_runner import ModelRunner

    from ..onpolicy import capture_hf

    record: dict[str, Any] = {}
    load, forward = ModelRunner.load_model, ModelRunner.forward
    count = [0]

    def load_model(self: Any) -> Any:
        out = load(self)
        capture_hf(self.model, record)  # SGLang's Llama/Qwen2 modules carry HF's names
        return out

    def run(self: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
        record.clear()
        out = forward(self, forward_batch, *args, **kwargs)
        if forward_batch.forward_mode.is_extend() and record and (Path(folder) / ARMED).exists():
            count[0] += 1
            torch.cuda.synchronize()
            saved = {k: v.cpu() for k, v in record.items()}
            saved["input_ids"] = forward_batch.input_ids.cpu()
            path = Path(folder) / f"{os.getpid()}-{count[0]:06d}.pt"
            torch.save(saved, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        record.clear()
        return out

    ModelRunner.load_model, ModelRunner.forward = load_model, run
