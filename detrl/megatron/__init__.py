"""Megatron-core for det-rl: the HF <-> Megatron name table (`names`), the GPTModel built from an HF
config (`model`), torch.distributed + Megatron parallel state (`parallel`), torch_dist checkpoint I/O
(`checkpoint`), and the CPU compatibility layer used only where CUDA is absent (`cpu`)."""
