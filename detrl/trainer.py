"""The GRPO trainer on Megatron-core: a GPTModel built from the HF config and loaded from the
converted torch_dist checkpoint; PPO-clip on group-normalized advantages, token-level mean, AdamW
on fp32 master weights, grad clipping; data and tensor parallel over torch.distributed (rank =
dp_rank * tp + tp_rank, Megatron's default order).

One process per rank (a Ray actor, or the caller's process in tests)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from .config import RunConfig, TrainConfig
from .grpo import Sample, StepResult, ppo_clip_token_loss
from .ledger import unragged
from .megatron.checkpoint import load_dist_checkpoint, save_dist_checkpoint
from .megatron.exact import engine_forward
from .megatron.layout import join_tp, tp_partition_dim
from .megatron.model import attention_mask, build_gpt_model
from .megatron.names import ArchMeta, check_tensor_parallel, megatron_to_hf
from .megatron.parallel import model_parallel
from .tensor_hash import tensor_digests


class GRPOTrainer:
    def __init__(
        self, cfg: RunConfig, hf_dir: str, megatron_ckpt: str, *, rank: int = 0, world_size: int = 1, store: Any = None
    ):
        self.cfg, self.hf_dir, self.ckpt = cfg, hf_dir, megatron_ckpt
        self.rank, self.world_size = rank, world_size
        self.tp = cfg.resources.tensor_parallel
        self.dp, self.dp_rank, self.tp_rank = world_size // self.tp, rank // self.tp, rank % self.tp
        self.meta = ArchMeta.from_hf_dir(hf_dir)
        check_tensor_parallel(self.meta, self.tp)
        self.dtype = cfg.train_dtype()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(model_parallel(rank, world_size, store=store, tp=self.tp, seed=cfg.seed))

        assert (ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank()) == (self.dp_rank, self.tp_rank)
        self._dp_group, self._tp_group = ps.get_data_parallel_group(), ps.get_tensor_model_parallel_group()
        # AdamW runs on fp32 master weights (the checkpoint is fp32); when the model computes in
        # fp32 they are the params, otherwise a bf16 model is fed from them after every update.
        det = cfg.determinism.enabled
        attn = cfg.train.attention
        # exact on-policy: on a GPU the forward runs the rollout engine's kernels (megatron/exact.py); on the
        # CPU each sample is its own micro-batch, the shape the hf engine scores it at
        self.exact = cfg.train.on_policy == "exact"
        self.engine_kernels = self.exact and self.device.type == "cuda"
        self.master_model = build_gpt_model(self.meta, "float32", deterministic=det, tp=self.tp, attention=attn)
        load_dist_checkpoint(self.master_model, megatron_ckpt)
        if self.dtype == "float32" and not self.engine_kernels:
            self.model = self.master_model
        else:
            self.model = build_gpt_model(
                self.meta, self.dtype, deterministic=det, tp=self.tp, attention=attn, engine_kernels=self.engine_kernels
            )
        self.params = [p for _, p in self.model.named_parameters()]
        self.names = [n for n, _ in self.model.named_parameters()]
        self.split_dims = [tp_partition_dim(n) if self.tp > 1 else None for n in self.names]
        master = dict(self.master_model.named_parameters())
        self.master = [master[n] for n in self.names]
        self._copy_master_to_model()
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.master,
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
            foreach=False,
            fused=False,
        )

    # -- forward
    def _logprobs(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Log-probs of the response tokens, flat in sample order (sample 0's tokens, then 1's...).
        Only response positions reach the output layer: a forward pre-hook selects them from the
        decoder's hidden states, so the vocabulary projection skips the prompt positions."""

        seqs = [s.prompt_ids + s.response_ids for s in samples]
        width = max(len(x) for x in seqs)
        tokens = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            tokens[r, : len(seq)] = torch.tensor(seq)
        # position t predicts token t+1: the response tokens are predicted at [p-1, p-1+n)
        s_idx = torch.cat(
            [torch.arange(len(s.prompt_ids) - 1, len(s.prompt_ids) - 1 + len(s.response_ids)) for s in samples]
        )
        b_idx = torch.cat([torch.full((len(s.response_ids),), r) for r, s in enumerate(samples)])
        labels = tokens[b_idx, s_idx + 1].to(self.device)[None]
        s_idx, b_idx, tokens = s_idx.to(self.device), b_idx.to(self.device), tokens.to(self.device)

        def only_response_positions(module, args, kwargs):
            hidden = args[0]  # [s, b, h]
            return (hidden[s_idx, b_idx].unsqueeze(1), *args[1:]), kwargs

        pos = torch.arange(width, device=self.device).unsqueeze(0).expand_as(tokens)
        causal = attention_mask("sdpa" if self.engine_kernels else self.cfg.train.attention, width, self.device)
        hook = self.model.output_layer.register_forward_pre_hook(only_response_positions, with_kwargs=True)
        kernels = engine_forward([len(x) for x in seqs]) if self.engine_kernels else contextlib.nullcontext()
        try:
            with kernels:
                logits = self.model(tokens, pos, causal)  # [1, n, vocab]
                logits = logits.float()
                temperature = self.cfg.rollout.temperature
                if temperature != 1.0:
                    logits = logits / temperature
                if self.exact:  # the engine's formula: log_softmax of the float32 logits, then the label's
                    logp = torch.log_softmax(logits[0], dim=-1)
                    return logp.gather(1, labels[0][:, None])[:, 0]
        finally:
            hook.remove()
        return -vocab_parallel_cross_entropy(logits, labels)[0]

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        """The current policy's log-probs of each sample's response, through the micro-batches a train
        step would use (no update)."""
        groups = micro_batches(samples, self.cfg.train, one_sample_each=self.exact and not self.engine_kernels)
        out: list[np.ndarray] = [np.zeros(0)] * len(samples)
        for _, idx in groups:
            batch = [samples[i] for i in idx]
            for i, row in zip(idx, _rows(self._logprobs(batch), batch)):
                out[i] = row
        return out

    # -- one GRPO update per call (or `updates_per_step` mini-batches)
    def train_step(self, samples: Sequence[Sample], global_tokens: Sequence[int]) -> StepResult:
        """`samples`: this data-parallel rank's shard (the same on every TP rank of it), mini-batch after
        mini-batch. `global_tokens[u]`: response tokens of mini-batch u over all ranks, the token-level
        mean's denominator."""
        cfg = self.cfg.train
        # exact on the CPU: every sample alone, the shape the hf engine scored it at
        groups = micro_batches(samples, cfg, one_sample_each=self.exact and not self.engine_kernels)
        micro = [(u, [samples[i] for i in idx]) for u, idx in groups]
        order = [i for _, idx in groups for i in idx]  # sample index of each output row
        rows: list[np.ndarray] = []
        old: list[torch.Tensor] = []
        if cfg.updates_per_step > 1:  # later mini-batches are off-policy: take all old log-probs first
            with torch.no_grad():
                for _, batch in micro:
                    logp = self._logprobs(batch)
                    old.append(logp)
                    rows.extend(_rows(logp, batch))
        losses, norms = [], []
        for u in range(cfg.updates_per_step):
            self.optimizer.zero_grad(set_to_none=True)
            for p in self.params:
                p.grad = None
            loss_sum = torch.zeros((), dtype=torch.float64)
            for k, (uu, batch) in enumerate(micro):
                if uu != u:
                    continue
                logp = self._logprobs(batch)
                if self.exact:  # the rollout's own log-probs, which the forward reproduced (checked by the loop)
                    old_logp = _rollout_logprobs(batch, self.device)
                    if not old:
                        rows.extend(_rows(logp, batch))
                elif old:
                    old_logp = old[k]
                else:  # one update per rollout: the policy is the rollout's, ratio == 1
                    old_logp = logp.detach()
                    rows.extend(_rows(old_logp, batch))
                adv = torch.tensor(
                    [s.advantage for s in batch for _ in s.response_ids], dtype=torch.float32, device=self.device
                )
                tok_loss = ppo_clip_token_loss(logp, old_logp, adv, cfg.eps_clip_low, cfg.eps_clip_high)
                loss = tok_loss.sum() / float(global_tokens[u])
                loss.backward()
                loss_sum += loss.detach().double().cpu()
                if self.model is not self.master_model:
                    self._accumulate_master_grads()
            self._allreduce_grads()
            norms.append(self._clip())
            self.optimizer.step()
            self._copy_master_to_model()
            losses.append(float(self._allreduce_scalar(loss_sum)))
        logprobs_out: list[np.ndarray] = [np.zeros(0)] * len(samples)
        for i, row in zip(order, rows):
            logprobs_out[i] = row
        return StepResult(
            losses=losses,
            grad_norms=norms,
            logprobs=logprobs_out,
            tokens=int(sum(len(s.response_ids) for s in samples)),
        )

    @torch.no_grad()
    def _copy_master_to_model(self) -> None:
        if self.model is not self.master_model:
            for p, m in zip(self.params, self.master):
                p.copy_(m.to(p.dtype))

    # -- resumable checkpoints: fp32 master weights (torch_dist), optimizer state, RNG states
    def save_checkpoint(self, path: str) -> None:

        save_dist_checkpoint(self.master_model, Path(path) / "weights")  # collective over the ranks
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(rng, Path(path) / f"rng_rank{self.rank}.pt")
        if self.dp_rank == 0:  # the optimizer is replicated over the data-parallel ranks
            torch.save(self.optimizer.state_dict(), Path(path) / f"optimizer_tp{self.tp_rank}.pt")

    def load_checkpoint(self, path: str) -> None:

        load_dist_checkpoint(self.master_model, Path(path) / "weights")
        self._copy_master_to_model()
        self.optimizer.load_state_dict(
            torch.load(Path(path) / f"optimizer_tp{self.tp_rank}.pt", map_location=self.device, weights_only=False)
        )
        rng = torch.load(Path(path) / f"rng_rank{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _accumulate_master_grads(self) -> None:
        for p, m in zip(self.params, self.master):
            if p.grad is None:
                continue
            g = p.grad.float()
            m.grad = g.clone() if m.grad is None else m.grad.add_(g)
            p.grad = None

    def _allreduce_grads(self) -> None:
        if self.dp == 1:
            return

        # One flat buffer in a fixed parameter order: with NCCL_ALGO=Ring the sum is reproducible.
        grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in self.master]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self._dp_group)
        offset = 0
        for m, g in zip(self.master, grads):
            m.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def _allreduce_scalar(self, x: torch.Tensor) -> torch.Tensor:
        if self.dp == 1:
            return x

        t = x.to(self.device)
        dist.all_reduce(t, group=self._dp_group)
        return t.cpu()

    def _clip(self) -> float:
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        if self.tp == 1:
            return float(torch.nn.utils.clip_grad_norm_(self.master, max_norm, foreach=False))

        # The global norm: squares of the TP-sharded grads summed over the TP group, the
        # replicated ones (norms) counted once.
        sharded = torch.zeros((), dtype=torch.float32, device=self.device)
        replicated = torch.zeros((), dtype=torch.float32, device=self.device)
        for m, dim in zip(self.master, self.split_dims):
            if m.grad is None:
                continue
            sq = torch.linalg.vector_norm(m.grad, dtype=torch.float32) ** 2
            if dim is not None:
                sharded += sq
            else:
                replicated += sq
        dist.all_reduce(sharded, group=self._tp_group)
        total = torch.sqrt(sharded + replicated)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for m in self.master:
            if m.grad is not None:
                m.grad.mul_(coef)
        return float(total)

    @torch.no_grad()
    def _full(self, params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Whole tensors under Megatron names, gathered over the TP group (a collective: every TP
        rank calls it); None on TP ranks other than 0."""
        if self.tp == 1:
            return {n: p.detach() for n, p in zip(self.names, params)}

        out = {}
        for n, p, dim in zip(self.names, params, self.split_dims):
            t = p.detach()
            if dim is not None:
                parts = [torch.empty_like(t) for _ in range(self.tp)]
                dist.all_gather(parts, t.contiguous(), group=self._tp_group)
                t = join_tp(n, parts)
            out[n] = t
        return out if self.tp_rank == 0 else None

    # -- weights
    def weight_hashes(self) -> dict[str, str] | None:
        full = self._full(self.master)
        return None if full is None else tensor_digests(full, self.cfg.ledger.tensor_hash)

    def export_hf(self, dtype: str, device: str = "cpu") -> dict[str, torch.Tensor] | None:
        """The model's current weights under HF names, on `device` (cpu: a copy), in the engine's
        dtype (None on TP ranks other than 0)."""
        target = getattr(torch, dtype)
        state = self._full(self.params)
        if state is None:
            return None
        return {k: v.to(device, target).contiguous() for k, v in megatron_to_hf(state, self.meta).items()}

    @torch.no_grad()
    def flip_bit(self, tensor: str, index: int, bit: int) -> None:
        """Flip one bit of element `index` of the tensor's first TP shard, on every data-parallel replica."""
        if tensor not in self.names:
            raise KeyError(f"no parameter {tensor!r}; parameters: {self.names[:4]}...")
        if self.tp_rank != 0:
            return
        m = self.master[self.names.index(tensor)]
        flat = m.data.view(-1)
        as_int = flat[index : index + 1].view(torch.int32)
        as_int ^= 1 << bit
        self._copy_master_to_model()

    def close(self) -> None:
        self._stack.close()


def micro_batches(
    samples: Sequence[Sample], cfg: TrainConfig, one_sample_each: bool = False
) -> list[tuple[int, list[int]]]:
    """(update, sample indices) of each micro-batch, update after update. By count (micro_batch_size,
    in data order) or by padded tokens (micro_batch_tokens: the update's samples sorted by length, ties
    by position, grouped while count x longest fits); `one_sample_each`: every sample alone. Either way
    a pure function of the lengths."""
    per_update = len(samples) // cfg.updates_per_step
    out: list[tuple[int, list[int]]] = []
    for u in range(cfg.updates_per_step):
        idx = list(range(u * per_update, (u + 1) * per_update))
        if one_sample_each:
            out += [(u, [i]) for i in idx]
            continue
        if cfg.micro_batch_tokens is None:
            out += [(u, idx[i : i + cfg.micro_batch_size]) for i in range(0, per_update, cfg.micro_batch_size)]
            continue
        length = {i: len(samples[i].prompt_ids) + len(samples[i].response_ids) for i in idx}
        group: list[int] = []
        for i in sorted(idx, key=lambda i: (length[i], i)):
            if group and (len(group) + 1) * length[i] > cfg.micro_batch_tokens:
                out.append((u, group))
                group = []
            group.append(i)
        out.append((u, group))
    return out


def _rollout_logprobs(samples: Sequence[Sample], device: torch.device) -> torch.Tensor:
    missing = [i for i, s in enumerate(samples) if s.rollout_logprobs is None]
    if missing:
        raise ValueError(f"exact on-policy training needs the rollout's log-probs; sample {missing[0]} has none")
    flat = [x for s in samples for x in (s.rollout_logprobs or [])]
    return torch.tensor(flat, dtype=torch.float32, device=device)


def _rows(logp: torch.Tensor, samples: Sequence[Sample]) -> list[np.ndarray]:
    flat = logp.detach().float().cpu().numpy()
    return [row.copy() for row in unragged(flat, [len(s.response_ids) for s in samples])]
