"""det-rl: bit-wise reproducible GRPO runs of LLMs, run twice and verified."""

__version__ = "0.1.0"
