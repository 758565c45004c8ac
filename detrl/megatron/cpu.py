"""Run Megatron-core 0.16 on a machine without CUDA (CI, laptops). Installed only when
`torch.cuda.is_available()` is False; on a GPU nothing here is touched.

Measured blockers (see the project notes) and what each patch does:
- rotary `inv_freq` and the global memory buffer are put on `torch.cuda.current_device()`
  -> `current_device` returns "cpu".
- `dist_checkpointing.save` calls `torch.cuda.synchronize` -> a no-op.
- the attention layers fork Megatron's CUDA RNG tracker -> a tracker whose states are CPU
  generator states (fork swaps `torch.get/set_rng_state`), so `model_parallel_cuda_manual_seed`
  works unchanged.
Not patched, handled by the callers instead: fusions are off in the model config (they import
CUDA extensions), the causal mask is always passed explicitly (the default one is built on
"cuda"), and the optimizer is `torch.optim.AdamW` (Megatron's asserts CUDA tensors).
`psutil` must be installed, or `dist_checkpointing.save` hangs in its forked writer.
"""

from __future__ import annotations

import contextlib

import torch

_installed = False


def install() -> bool:
    """Apply the patches once, only without CUDA. Returns whether they are active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    torch.cuda.synchronize = lambda *args, **kwargs: None

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _installed = True
    return True
