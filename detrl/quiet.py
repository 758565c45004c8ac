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
)
# (the logger that emits it, the message): logger filters apply to records of that logger only
LOG_LINES: tuple[tuple[str, str], ...] = (
    ("ray._private.authentication.authentication_token_setup", r"Token authentication is enabled for this Ray"),
    ("transformers.utils.generic", r"`past_key_values`/`cache_params` are deprecated"),
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
