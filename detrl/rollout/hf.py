"""The reference rollout engine: a transformers model with KV-cache decoding on the CPU (or any
device), fp32, with seeded sampling whose draw depends only on (sample seed, position), the same
contract as SGLang's `sampling_seed`.

Batch invariance: in `per_sequence` mode each sequence runs alone (batch 1), so nothing else in a
request can change its arithmetic. On the CPU a matmul of M=1 rows takes a different kernel than
M>1 (their results differ in the low bits), so the `padded` mode, one padded batch as `generate()` does, is
batch-variant; the self-test shows it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import HFEngineConfig
from . import Generation, SamplingParams

_MASK64 = (1 << 64) - 1


def noise_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed from (sample seed, position): a splitmix64 finalizer over both."""
    x = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def sample_token(
    logits: torch.Tensor, seed: int | None, position: int, temperature: float, top_p: float
) -> tuple[int, float]:
    """Gumbel-max over the (top-p truncated) temperature-scaled distribution, noise in float64 from a
    generator seeded by (seed, position). Returns the token and its log-prob before truncation.
    Temperature 0 is greedy: the first most likely token, with its log-prob at temperature 1."""
    if temperature == 0:
        logp0 = torch.log_softmax(logits.float(), dim=-1)
        token = int(torch.argmax(logp0))
        return token, float(logp0[token])
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    score = logp.double()
    if top_p < 1.0:
        probs, order = torch.sort(logp.exp(), descending=True)
        cut = (torch.cumsum(probs, 0) - probs) > top_p
        score[order[cut]] = float("-inf")
    gen = torch.Generator().manual_seed(
        noise_seed(seed, position) if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    )
    u = torch.rand(score.shape, generator=gen, dtype=torch.float64)
    token = int(torch.argmax(score - torch.log(-torch.log(u))))
    return token, float(logp[token])


class HFEngine:
    def __init__(
        self,
        model_dir: str,
        cfg: HFEngineConfig,
        *,
        deterministic: bool = True,
        device: str = "cpu",
        prefill_logprobs: bool = False,
    ):
        """`prefill_logprobs`: each response's log-probs come from one pass over prompt + response after
        it was sampled (exact on-policy mode, `detrl.onpolicy`), not from the decode steps."""
        from transformers import AutoModelForCausalLM

        self.cfg, self.deterministic, self.device = cfg, deterministic, device
        self.prefill_logprobs = prefill_logprobs
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=cfg.attn_implementation
        )
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)

    # -- generation
    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None, params: SamplingParams
    ) -> list[Generation]:
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        seeds_: Sequence[int | None] = seeds if seeds is not None else [None] * len(prompts)
        if self.cfg.batching == "padded":
            gens = self._generate_padded(prompts, seeds_, params)
        else:
            gens = [self._generate_one(list(p), s, params) for p, s in zip(prompts, seeds_)]
        if self.prefill_logprobs:
            for p, g in zip(prompts, gens):
                g.logprobs = self.score(list(p), g.token_ids, params.temperature or 1.0)
        return gens

    @torch.no_grad()
    def score(self, prompt: list[int], response: list[int], temperature: float = 1.0) -> list[float]:
        """Log-probs of `response` after `prompt` from one forward over both (the sequence alone): the
        hidden states that predict the response, the output layer on just those rows, then log_softmax of
        the float32 logits, as the trainer computes them."""
        if not response:
            return []
        ids = torch.tensor([prompt + response], device=self.device)
        hidden = self.model.model(input_ids=ids).last_hidden_state[0]
        p, n = len(prompt), len(response)
        logits = self.model.lm_head(hidden[p - 1 : p - 1 + n]).float()
        if temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(1, torch.tensor(response, device=self.device)[:, None])[:, 0].tolist()

    def _generate_one(self, prompt: list[int], seed: int | None, params: SamplingParams) -> Generation:
        ids = torch.tensor([prompt], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past, tokens, logps, reason = out.past_key_values, [], [], "length"
        for i in range(params.max_new_tokens):
            tok, lp = sample_token(out.logits[0, -1], seed, len(prompt) + i, params.temperature, params.top_p)
            tokens.append(tok)
            logps.append(lp)
            if tok in params.stop_token_ids:
                reason = "stop"
                break
            if i + 1 == params.max_new_tokens:
                break
            out = self.model(input_ids=torch.tensor([[tok]], device=self.device), past_key_values=past, use_cache=True)
            past = out.past_key_values
        return Generation(tokens, logps, reason)

    def _generate_padded(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[int | None], params: SamplingParams
    ) -> list[Generation]:
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((n, width), dtype=torch.long, device=self.device)
        mask = torch.zeros((n, width), dtype=torch.long, device=self.device)
        for r, p in enumerate(prompts):  # left padding
            ids[r, width - len(p) :] = torch.tensor(list(p))
            mask[r, width - len(p) :] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        gens = [Generation([], [], "length") for _ in prompts]
        done = [False] * n
        for i in range(params.max_new_tokens):
            nxt = torch.zeros((n, 1), dtype=torch.long, device=self.device)
            for r in range(n):
                if done[r]:
                    continue
                tok, lp = sample_token(
                    out.logits[r, -1], seeds[r], len(prompts[r]) + i, params.temperature, params.top_p
                )
                gens[r].token_ids.append(tok)
                gens[r].logprobs.append(lp)
                nxt[r, 0] = tok
                if tok in params.stop_token_ids:
                    done[r], gens[r].finish_reason = True, "stop"
            if all(done) or i + 1 == params.max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long, device=self.device)], 1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = out.past_key_values
        return gens

    # -- weights
    def _params(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())  # a tied lm_head is listed once, as embed_tokens

    @torch.no_grad()
    def update_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        params = self._params()
        unknown = sorted(set(named_tensors) - set(params))
        if unknown:
            raise KeyError(f"engine has no parameters named {unknown[:5]}")
        for name, t in named_tensors.items():
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: update shape {tuple(t.shape)} != engine {tuple(params[name].shape)}")
            params[name].copy_(t)

    @torch.no_grad()
    def verify_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> list[str]:
        params = self._params()
        bad = [n for n in params if n not in named_tensors or not torch.equal(params[n], named_tensors[n])]
        return bad + [f"{n} (unknown to the engine)" for n in named_tensors if n not in params]

    def info(self) -> dict[str, Any]:
        return {
            "backend": "hf",
            "dtype": "float32",
            "batching": self.cfg.batching,
            "attn_implementation": self.cfg.attn_implementation,
            "device": self.device,
            "deterministic": self.deterministic,
            "logprobs": "prefill" if self.prefill_logprobs else "decode",
        }

    def shutdown(self) -> None:
        self.model = None
