"""Known third-party noise, filtered from the driver's and the workers' logs so real warnings stand
out. Each entry is a message that says nothing about this run: optional fused kernels det-rl does not
use on purpose (Apex, Transformer Engine), and deprecations inside libraries. Anything else, ours or
theirs, is still shown."""

from __future__ import annotations

import logging
import os
import re
import warnings

WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, r"(Transformer Engine and )?Apex (is|are) not installed"),
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r"TypedStorage is deprecated"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (FutureWarning, r"`load_state_dict` is deprecated"),
    (FutureWarning, r"`past_key_values` is deprecated"),
    # torch.distributed's advice for a barrier without device_id (the converter's single-process group)
    (UserWarning, r"barrier\(\): using the device under current context"),
    # SGLang's batch-invariant mode replacing aten kernels, which is what determinism asks of it
    (UserWarning, r"Warning only once for all operators"),
)
# (the logger that emits it, the message): logger filters apply to records of that logger only
LOG_LINES: tuple[tuple[str, str], ...] = (
    ("ray._private.authentication.authentication_token_setup", r"Token authentication is enabled for this Ray"),
    ("transformers.utils.generic", r"`past_key_values`/`cache_params` are deprecated"),
    # SGLang's notes on what deterministic inference turns off, which det-rl asks for and records
    ("sglang.srt.arg_groups.overrides", r"Sampling backend is set to pytorch for deterministic inference"),
    ("sglang.srt.server_args", r"radix cache is not compatible with \w+ attention backend for deterministic"),
    # the engine is given token ids, never chat messages; and host limits and optional models it lacks
    ("sglang.srt.parser.template_manager", r"No HuggingFace chat template found"),
    ("sglang.srt.utils.common", r"Fail to set RLIMIT_NOFILE"),
    (
        "sglang.srt.models.registry",
        r"Ignore import error when loading sglang\.srt\.models\.\w+: No module named 'helion'",
    ),
)


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_installed = False


def install() -> None:
    """Idempotent; call before the noisy libraries are imported (their warnings fire at import)."""
    global _installed
    if _installed:
        return
    # progress bars of loading and writing weights: a line of noise per worker in a log (set it to 0 to see them)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category, pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}", category=category)
    for name, pattern in LOG_LINES:
        logging.getLogger(name).addFilter(_Drop(pattern))
    _installed = True
