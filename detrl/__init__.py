"""det-rl: bit-wise reproducible GRPO runs of LLMs, run twice and verified."""

from . import quiet

__version__ = "0.1.0"
quiet.install()  # before any noisy library is imported by a det-rl module
