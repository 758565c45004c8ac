"""The SGLang rollout engine: `sglang.Engine` (offline API) with token ids in and out, deterministic
inference when determinism is on, per-sample `sampling_seed`, weight sync through
`update_weights_from_tensor`, and a proof of the weights it holds through its own weight checker.

Weights travel one of two ways. By tensor (`update_weights`): CPU tensors, e.g. through Ray's object
store. By CUDA IPC (`detrl.weight_sync.ipc.pack` in the trainer's process, `update_weights_ipc` here): the trainer
flattens its GPU tensors into one bucket and sends only a handle to it; the engine's scheduler copies
from the trainer's memory on the same GPU, so nothing crosses the host.

The proof: SGLang fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`. The engine's
`check_weights(action="checksum")` hashes every parameter it holds on the GPU; we fuse the trainer's
tensors the same way, hash them with the same function, and compare parameter by parameter. Any
parameter the trainer's tensors do not cover also counts as a mismatch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import SGLangConfig
from ..megatron.layout import sglang_layout
from . import Generation, SamplingParams, sglang_plugin
from .sglang_ahead import Start, prepare


def expected_checksums(named: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """What the engine's own checksum must say of each parameter it holds, given HF-named tensors."""
    from sglang.srt.managers.mm_utils import tensor_hash

    with torch.no_grad():
        return {n: f"{tensor_hash(t.to('cuda').contiguous()):016x}" for n, t in sglang_layout(named).items()}


class SGLangEngine:
    def __init__(
        self,
        model_dir: str,
        cfg: SGLangConfig,
        *,
        deterministic: bool = True,
        seed: int | None = 0,
        kv_tokens: int | None = None,
        engine_args: Mapping[str, Any] | None = None,
        prefill_logprobs: bool = False,
        schedule_args: Mapping[str, int] | None = None,
        start: Start | None = None,
    ):
        """`kv_tokens`: a KV cache of exactly this many tokens (runs sharing a GPU) instead of
        mem_fraction_static of the GPU. `engine_args`: further `sgl.Engine` arguments, last (the
        benchmarks' knob variants). `prefill_logprobs`: the log-probs of each response come from a
        prefill over prompt + response once it is sampled (exact on-policy, `detrl.onpolicy`).
        `schedule_args`: batch limits of a perturbed schedule (detrl.schedule), over the config's.
        `start`: what `prepare` set and started for this engine (None: prepared here)."""
        self.cfg, self.deterministic, self.kv_tokens = cfg, deterministic, kv_tokens
        self.prefill_logprobs = prefill_logprobs
        self.engine: Any = None
        self.plugin: dict[str, Any] | None = None
        self.engine_args = dict(engine_args or {})
        self.schedule_args = dict(schedule_args or {})
        kwargs: dict[str, Any] = dict(
            model_path=model_dir,
            attention_backend=cfg.attention_backend,
            dtype=cfg.dtype,
            enable_deterministic_inference=deterministic,
            mem_fraction_static=cfg.mem_fraction_static,
            # seed None (production mode) seeds the engine's sampler from OS entropy: a pinned seed
            # alone made a fixed offline batch reproduce even without deterministic kernels (H100)
            random_seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little") >> 2,
            skip_tokenizer_init=True,
            log_level=cfg.log_level,
            # prefill CUDA graphs were not part of the verified setup; decode graphs are
            disable_prefill_cuda_graph=True,
        )
        if kv_tokens:
            # SGLang sizes its cache from the memory free when it starts, less a slack of (1 - fraction)
            # of it; the other run's engine and trainer allocate meanwhile. With the cache capped, a high
            # fraction keeps that budget above zero while they do; the pool is the cap either way.
            kwargs["max_total_tokens"] = kv_tokens
            kwargs["mem_fraction_static"] = max(cfg.mem_fraction_static, 0.85)
        if cfg.cuda_graph_max_bs:
            kwargs["cuda_graph_max_bs_decode"] = cfg.cuda_graph_max_bs
        if cfg.disable_cuda_graph:
            kwargs["disable_cuda_graph"] = True
        if cfg.disable_radix_cache is not None:
            kwargs["disable_radix_cache"] = cfg.disable_radix_cache
        if cfg.max_running_requests:
            kwargs["max_running_requests"] = cfg.max_running_requests
        if cfg.chunked_prefill_size:
            kwargs["chunked_prefill_size"] = cfg.chunked_prefill_size
        kwargs.update(self.schedule_args)
        kwargs.update(self.engine_args)
        start = start or prepare(cfg, deterministic)
        self.kernels, ahead = start.kernels, start.ahead
        try:
            start.imported()
            import sglang as sgl
            import sglang.srt.entrypoints.engine as sglang_engine

            with ahead.serving(sglang_engine) if ahead else contextlib.nullcontext():
                self.engine = sgl.Engine(**kwargs)
        finally:
            start.close()
            reports = sglang_plugin.read_reports(start.reports)
        self.started_ahead = ahead.report() if ahead else []
        for r in self.started_ahead:
            took = "took its work" if r["refused"] is None else f"was refused ({r['refused']}); SGLang started its own"
            print(f"det-rl: the process started ahead for {r['module']} (import {r['import_s']} s) {took}", flush=True)
        if self.kernels == "detrl":
            self._check_plugin(reports)

    def _check_plugin(self, reports: dict[int, dict[str, Any]]) -> None:
        """At least one of the engine's processes (not this one) patched SGLang, and none failed."""
        errors = [r["error"] for r in reports.values() if "error" in r]
        patched = {pid: r for pid, r in reports.items() if pid != os.getpid() and "patched" in r}
        if errors or not patched:
            self.shutdown()
            why = "; ".join(errors) or "no scheduler process of SGLang loaded det-rl's plugin (see its log)"
            raise RuntimeError(
                f"det-rl's kernels did not load into SGLang ({why}); "
                "set rollout.sglang.kernels=sglang to run SGLang's own deterministic kernels"
            )
        names = sorted({name for r in patched.values() for name in r["patched"]})
        self.plugin = {"patched": names, "processes": len(patched)}

    def generate(
        self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None, params: SamplingParams
    ) -> list[Generation]:
        base = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_new_tokens": params.max_new_tokens,
            "stop_token_ids": list(params.stop_token_ids),
        }
        sp = [dict(base, sampling_seed=int(s)) for s in seeds] if seeds is not None else [dict(base) for _ in prompts]
        outs = self.engine.generate(input_ids=[list(p) for p in prompts], sampling_params=sp, return_logprob=True)
        gens = []
        for o in outs:
            meta = o["meta_info"]
            reason = (meta.get("finish_reason") or {}).get("type", "length")
            gens.append(
                Generation(
                    token_ids=list(o["output_ids"]),
                    logprobs=[float(x[0]) for x in meta["output_token_logprobs"]],
                    finish_reason="stop" if reason in ("stop", "matched") else "length",
                )
            )
        if self.prefill_logprobs:
            for g, lp in zip(gens, self.score(prompts, [g.token_ids for g in gens])):
                g.logprobs = lp
        return gens

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-probs of each response after its prompt from SGLang's prefill over both, without
        temperature. Each request generates one greedy token, which is dropped: a prefill-only request
        (max_new_tokens 0) takes SGLang's separate prefill-only scheduling path, and a batch of them,
        chunked and above the running-request limit (run B's schedule), did not finish on an H200
        (tests/test_gpu.py holds the case)."""
        todo = [i for i, r in enumerate(responses) if r]
        out: list[list[float]] = [[] for _ in responses]
        if not todo:
            return out
        results = self.engine.generate(
            input_ids=[list(prompts[i]) + list(responses[i]) for i in todo],
            sampling_params=[{"max_new_tokens": 1, "temperature": 0.0} for _ in todo],
            return_logprob=True,
            # from the prompt's last token, whose own entry SGLang leaves empty: then one per response token
            logprob_start_len=[len(prompts[i]) - 1 for i in todo],
        )
        for i, o in zip(todo, results):
            got = [x[0] for x in o["meta_info"]["input_token_logprobs"]][1:]
            if len(got) != len(responses[i]) or any(x is None for x in got):
                raise RuntimeError(f"SGLang scored {len(got)} of the {len(responses[i])} response tokens of sample {i}")
            out[i] = [float(x) for x in got]
        return out

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        # On the GPU first: SGLang hands CUDA tensors to its scheduler by IPC handle, not by copy.
        tensors = [(n, t.to("cuda", non_blocking=True)) for n, t in named_tensors.items()]
        torch.cuda.synchronize()
        ok, message = self.engine.update_weights_from_tensor(named_tensors=tensors, flush_cache=True)[:2]
        if not ok:
            raise RuntimeError(f"SGLang rejected the weight update: {message}")

    def update_weights_ipc(self, payload: bytes) -> None:
        """Load a bucket another process on this GPU packed with `detrl.weight_sync.ipc.pack`."""
        ok, message = self.engine.update_weights_from_tensor(
            named_tensors=[payload], load_format="flattened_bucket", flush_cache=True
        )[:2]
        if not ok:
            raise RuntimeError(f"SGLang rejected the weight update: {message}")

    def checksums(self) -> dict[str, str]:
        from sglang.srt.managers.io_struct import CheckWeightsReqInput

        tm = self.engine.tokenizer_manager
        ok, message, ranks, _ = self.engine.loop.run_until_complete(
            tm.check_weights(CheckWeightsReqInput(action="checksum"), None)
        )
        if not ok or not ranks:
            raise RuntimeError(f"SGLang weight checksum failed: {message}")
        return dict(ranks[0]["checksums"])

    def verify_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> list[str]:
        return self.verify_checksums(expected_checksums(named_tensors))

    def verify_checksums(self, expected: Mapping[str, str]) -> list[str]:
        """Compare the engine's own checksum of every parameter with `expected_checksums`."""
        held = self.checksums()
        bad = [n for n in expected if held.get(n) != expected[n]]
        return bad + [
            f"{n} (held by the engine, not covered by the trainer's tensors)" for n in held if n not in expected
        ]

    def info(self) -> dict[str, Any]:
        import importlib.metadata

        return {
            "backend": "sglang",
            "sglang": importlib.metadata.version("sglang"),
            "dtype": self.cfg.dtype,
            "attention_backend": self.cfg.attention_backend,
            "deterministic": self.deterministic,
            "mem_fraction_static": self.cfg.mem_fraction_static,
            "kv_tokens": self.kv_tokens,
            "disable_radix_cache": self.cfg.disable_radix_cache,
            "kernels": self.kernels,
            "logprobs": "prefill" if self.prefill_logprobs else "decode",
            **({"engine_args": self.engine_args} if self.engine_args else {}),
            **({"schedule_args": self.schedule_args} if self.schedule_args else {}),
        }

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
