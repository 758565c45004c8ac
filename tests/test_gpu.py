"""GPU path (run on a CUDA host with the GPU stack: pytest -m gpu). SGLang batch invariance and seed
semantics, the weight-sync proof (by tensor and by CUDA IPC), and the loop run twice through Ray,
both runs sharing one GPU: identical to each other and to a run alone with determinism on, diverged
with it off."""

import pytest
import torch

from detrl.config import RandomModelSpec, SGLangConfig, load_config
from detrl.rollout import SamplingParams

pytestmark = pytest.mark.gpu

SMALL = [
    "model.source=random",
    "model.random.hidden_size=896",
    "model.random.num_layers=4",
    "model.random.num_attention_heads=14",
    "model.random.num_key_value_heads=2",
    "model.random.intermediate_size=4864",
    "model.random.dtype=bfloat16",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=48",
    "train.steps=2",
    "train.micro_batch_size=8",
    "rollout.sglang.mem_fraction_static=0.3",
    # the mechanics these tests prove hold in either mode; exact mode's own proofs are the test_exact_*
    # tests here and the nightly flows
    "train.on_policy=approx",
]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    from detrl.models import write_random_qwen2

    spec = RandomModelSpec(
        hidden_size=896,
        num_layers=4,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        dtype="bfloat16",
        seed=0,
    )
    return str(write_random_qwen2(spec, tmp_path_factory.mktemp("m") / "qwen", device="cuda"))


@pytest.fixture(scope="module")
def engine(gpu_model):
    from detrl.rollout.sglang import SGLangEngine

    eng = SGLangEngine(gpu_model, SGLangConfig(mem_fraction_static=0.3, cuda_graph_max_bs=16), deterministic=True)
    yield eng
    eng.shutdown()


TARGET = list(range(2000, 2060))
OTHERS = [list(range(5000 + 301 * i, 5000 + 301 * i + 12 + 9 * i)) for i in range(15)]


def test_one_prompt_in_batches_of_1_to_16_is_bitwise_stable(engine):
    for seed in (None, 42):  # greedy, then seeded sampling at temperature 1
        params = SamplingParams(max_new_tokens=32, temperature=1.0 if seed else 0.0)
        outs = set()
        for bs in range(1, 17):
            pos = (bs - 1) // 2
            batch = OTHERS[: bs - 1]
            batch = batch[:pos] + [TARGET] + batch[pos:]
            seeds = [seed if i == pos else 7 + i for i in range(bs)] if seed else None
            g = engine.generate(batch, seeds, params)[pos]
            outs.add((tuple(g.token_ids), torch.tensor(g.logprobs, dtype=torch.float64).numpy().tobytes()))
        assert len(outs) == 1, f"seed {seed}: {len(outs)} distinct outputs over batch sizes 1..16"


def test_sglangs_scheduler_and_detokenizer_run_in_the_processes_started_ahead(engine):
    from detrl.rollout.sglang_ahead import SGLANG_MODULES

    report = engine.started_ahead
    assert [r["module"] for r in report] == list(SGLANG_MODULES)
    assert [r["refused"] for r in report] == [None, None], report
    assert {r["pid"] for r in report} <= set(engine.engine._scheduler_init_result.all_child_pids)


def test_seed_semantics(engine):
    p = SamplingParams(max_new_tokens=24)
    a = engine.generate([TARGET] * 3, [42, 42, 43], p)
    assert a[0].token_ids == a[1].token_ids != a[2].token_ids
    assert engine.generate([TARGET], [42], p)[0].token_ids == a[0].token_ids


def _one_bit_flipped(state: dict, name: str) -> dict:
    """`state` with one bit of one bf16 element of `name` flipped, in a copy of that tensor."""
    changed = {**state, name: state[name].clone()}
    changed[name].view(-1)[3:4].view(torch.int16).__ixor__(1)
    return changed


def test_weight_sync_is_proven_bitwise(engine, gpu_model):
    from detrl.megatron.checkpoint import load_hf_state

    state = load_hf_state(gpu_model)
    assert engine.verify_weights(state) == []
    name = "model.layers.1.self_attn.k_proj.weight"
    changed = _one_bit_flipped(state, name)
    assert engine.verify_weights(changed) == ["model.layers.1.self_attn.qkv_proj.weight"]
    before = engine.generate([TARGET], [5], SamplingParams(max_new_tokens=16))[0]
    engine.update_weights({name: changed[name]})
    assert engine.verify_weights(changed) == []
    assert engine.verify_weights(state) == ["model.layers.1.self_attn.qkv_proj.weight"]
    engine.update_weights({name: state[name]})
    assert engine.verify_weights(state) == []
    after = engine.generate([TARGET], [5], SamplingParams(max_new_tokens=16))[0]
    assert after.token_ids == before.token_ids and after.logprobs == before.logprobs  # restored bitwise


def test_the_object_store_payload_loads_into_sglang_bit_for_bit(engine, gpu_model):
    """The object_store transport's payload (NumPy byte views, bf16 included) as the engine's actor gets it:
    loaded, it is what SGLang holds, by SGLang's own checksum; one flipped bit in it is named."""
    from detrl.megatron.checkpoint import load_hf_state
    from detrl.weight_sync import object_store

    state = load_hf_state(gpu_model)
    name = "model.layers.1.self_attn.k_proj.weight"
    changed = _one_bit_flipped(state, name)
    assert object_store.load(engine, object_store.pack(changed), None, True) == []
    assert engine.verify_weights(state) == ["model.layers.1.self_attn.qkv_proj.weight"]
    assert object_store.load(engine, object_store.pack(state), None, True) == []
    assert engine.verify_weights(state) == []


def test_weight_sync_by_cuda_ipc_is_proven_bitwise(engine, gpu_model):
    """The trainer's side (this process) packs GPU tensors and sends a handle; the engine's scheduler
    loads from this process's memory; its own checksums prove what it holds."""
    from detrl.megatron.checkpoint import load_hf_state
    from detrl.rollout.sglang import expected_checksums
    from detrl.weight_sync.ipc import pack as pack_for_ipc

    state = {k: v.to("cuda") for k, v in load_hf_state(gpu_model).items()}
    name = "model.layers.2.mlp.down_proj.weight"
    changed = dict(state)
    changed[name] = state[name].clone()
    changed[name].view(-1)[7:8].view(torch.int16).__ixor__(1)
    payload, bucket = pack_for_ipc(changed)
    assert len(payload) < 1 << 20  # a handle and names, not the weights
    engine.update_weights_ipc(payload)
    del bucket
    assert engine.verify_checksums(expected_checksums(changed)) == []
    assert engine.verify_checksums(expected_checksums(state)) == [name]
    payload, bucket = pack_for_ipc(state)
    engine.update_weights_ipc(payload)
    del bucket
    assert engine.verify_weights(state) == []


def test_scoring_under_run_b_limits_finishes_and_equals_an_engine_without_them(engine, gpu_model):
    """Exact mode scores prompt + response by prefill. Run B's engine has other batch limits: a smaller
    running-request limit (the scoring queues behind it) and another prefill chunk, which cuts the longest
    sequences here at a split tile. Its scores must come back, bit for bit those of an engine without those
    limits. (With a chunk below the tile, SGLang never scheduled the longer requests: the config refuses it.)"""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from detrl.config import sglang_prefill_tile
    from detrl.rollout.sglang import SGLangEngine

    rng = np.random.default_rng(0)
    tile = sglang_prefill_tile()
    assert tile
    prompts = [rng.integers(1000, 30000, int(rng.integers(100, 300))).tolist() for _ in range(128)]
    responses = [rng.integers(1000, 30000, int(rng.integers(1, 1024))).tolist() for _ in range(124)]
    responses += [rng.integers(1000, 30000, tile + 300 * i).tolist() for i in range(4)]  # cut at the tile
    plain = engine.score(prompts, responses)
    # run B's smaller chunk (one tile: detrl.schedule), and a running-request limit below the 128 requests
    limits = {"chunked_prefill_size": tile, "max_running_requests": 80, "cuda_graph_max_bs_decode": 80}
    b = SGLangEngine(gpu_model, SGLangConfig(), deterministic=True, kv_tokens=200_000, schedule_args=limits)
    try:
        with ThreadPoolExecutor(1) as pool:
            got = pool.submit(b.score, prompts, responses).result(timeout=300)
    finally:
        b.shutdown()
    assert [len(x) for x in got] == [len(r) for r in responses]
    assert got == plain


def test_engine_runs_detrls_kernels(engine):
    from detrl.rollout.sglang_plugin import PATCHED

    assert engine.info()["kernels"] == "detrl" and engine.plugin["patched"] == sorted(PATCHED)


def test_detrl_rms_norm_is_batch_invariant_and_close_to_sglangs():
    from sglang.srt.batch_invariant_ops import disable_batch_invariant_mode, enable_batch_invariant_mode

    from detrl.rollout import det_kernels
    from detrl.rollout.sglang_plugin import sglang_native_add_rms_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    for hidden in (576, 896):
        x = (torch.randn(600, hidden, device="cuda", generator=g) * 3).bfloat16()
        r = (torch.randn(600, hidden, device="cuda", generator=g) * 3).bfloat16()
        w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).bfloat16()
        out, res = det_kernels.add_rms_norm(x, r, w, 1e-5)
        for n in (1, 2, 7, 64, 255, 256, 511):
            for k in (0, 9):
                part = det_kernels.add_rms_norm(x[k : k + n], r[k : k + n], w, 1e-5)
                assert torch.equal(part[0], out[k : k + n]) and torch.equal(part[1], res[k : k + n]), (hidden, n, k)
        enable_batch_invariant_mode()
        try:
            native = sglang_native_add_rms_norm(x, r, w, 1e-5)
        finally:
            disable_batch_invariant_mode()
        assert torch.equal(res, native[1])  # the residual is the same rounding of the same sum
        assert torch.allclose(out.float(), native[0].float(), rtol=2**-7, atol=1e-3)


@pytest.mark.integration
def test_loop_twice_sharing_one_gpu_equals_a_run_alone_and_nondeterministic_mode_diverges(tmp_path):
    from detrl import twice
    from detrl.ledger import read_ledger
    from detrl.loop import prepare, run
    from detrl.ray.session import shared_ray
    from detrl.rollout import step_kv_tokens
    from detrl.verify import verify

    def pair(cfg, a, b):
        shared = twice.run_config(cfg, "shared_gpu")
        runs = (lambda: run(shared, tmp_path / a, arts), lambda: run(shared, tmp_path / b, arts))
        twice.run_both(*runs, "shared_gpu", shared_ray(cfg))
        return verify(str(tmp_path / a), str(tmp_path / b))

    cfg = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=SMALL)
    assert cfg.ipc_weight_sync
    arts = prepare(cfg, tmp_path / "cache")
    v = pair(cfg, "a", "b")
    assert v.status == "identical", v.first
    engine = read_ledger(tmp_path / "a").header["engine"]
    assert engine["kv_tokens"] == step_kv_tokens(cfg)
    run(cfg, tmp_path / "alone", arts)  # the whole GPU, its default KV cache
    v_alone = verify(str(tmp_path / "a"), str(tmp_path / "alone"))
    assert v_alone.status == "identical", v_alone.first
    assert v_alone.config_diff_other == ["resources.gpu_share: 0.5 -> 1.0"]
    off = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=[*SMALL, "determinism.enabled=false"])
    v_off = pair(off, "off_a", "off_b")
    assert v_off.status == "diverged" and "determinism was off" in v_off.likely_cause


def test_fused_attention_backward_is_bitwise_repeatable(tmp_path):
    """train.attention=sdpa runs FlashAttention-2 on the GPU; in strict mode its backward must not
    depend on the order of atomics: two trainers given the same steps end on the same bits."""
    from pathlib import Path

    from detrl.determinism import apply_process_settings
    from detrl.ledger import combine
    from detrl.loop import prepare
    from detrl.trainer import GRPOTrainer, Sample

    cfg = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=[*SMALL, "train.micro_batch_tokens=8192"])
    assert cfg.train.attention == "sdpa"
    arts = prepare(cfg, tmp_path / "cache")
    ckpt = str(Path(arts.megatron.path) / "weights")
    g = torch.Generator().manual_seed(0)
    samples = [
        Sample(
            torch.randint(100, 150000, (200 + 37 * i,), generator=g).tolist(),
            torch.randint(100, 150000, (300 + 53 * i,), generator=g).tolist(),
            (-1.0) ** i,
        )
        for i in range(8)
    ]
    tokens = [sum(len(s.response_ids) for s in samples)]
    apply_process_settings(True, cfg.seed)
    ends = []
    for _ in range(2):
        t = GRPOTrainer(cfg, arts.model.path, ckpt)
        norms = [t.train_step(samples, tokens).grad_norms[0] for _ in range(2)]
        ends.append((combine(t.weight_hashes()), norms))
        t.close()
    assert ends[0] == ends[1]
    assert ends[0][1][0] > 0


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nvidia-h200-x2)")
# The trainer layout is under test here, so the engine skips CUDA-graph capture (40 s a start).
LAYOUT = [*SMALL, "rollout.sglang.disable_cuda_graph=true", "resources.num_gpus=2"]


@pytest.fixture(scope="module")
def gpu_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@two_gpus
def test_tensor_parallel_2_on_two_gpus_twice_identical(tmp_path, gpu_cache):
    from detrl.ledger import read_ledger
    from detrl.loop import prepare, run
    from detrl.verify import verify

    cfg = load_config(
        "gsm8k-qwen2.5-0.5b-smoke", overrides=[*LAYOUT, "resources.trainer_ranks=2", "resources.tensor_parallel=2"]
    )
    arts = prepare(cfg, gpu_cache)
    for name in ("a", "b"):
        run(cfg, tmp_path / name, arts)
    v = verify(str(tmp_path / "a"), str(tmp_path / "b"))
    assert v.status == "identical", v.first
    header = read_ledger(tmp_path / "a").header
    assert header["fingerprints"]["trainer1"]["layout"] == {"dp": 1, "tp": 2, "pp": 1}
    assert header["fingerprints"]["trainer1"]["env"]["NCCL_ALGO"] == "Ring"
    assert (
        header["placement"]["trainer0"]["cuda_visible_devices"]
        != header["placement"]["trainer1"]["cuda_visible_devices"]
    )


@two_gpus
def test_engine_on_its_own_gpu_equals_colocated(tmp_path, gpu_cache):
    """Where the engine runs is not part of the arithmetic: SGLang on GPU 1 and the trainer on GPU 0
    give the same ledger as both sharing GPU 0."""
    from detrl.ledger import read_ledger
    from detrl.loop import prepare, run
    from detrl.verify import verify

    shared = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=[*LAYOUT, "resources.num_gpus=1"])
    own = load_config("gsm8k-qwen2.5-0.5b-smoke", overrides=[*LAYOUT, "resources.colocate=false"])
    arts = prepare(shared, gpu_cache)
    run(shared, tmp_path / "shared", arts)
    run(own, tmp_path / "own", arts)
    place = read_ledger(tmp_path / "own").header["placement"]
    assert place["rollout"]["cuda_visible_devices"] != place["trainer0"]["cuda_visible_devices"]
    v = verify(str(tmp_path / "shared"), str(tmp_path / "own"))
    assert v.status == "identical", v.first


def test_exact_on_policy_trainer_reproduces_sglangs_prefill(tmp_path):
    """The exact trainer's log-probs and every op's output equal SGLang's prefill (the script exits 0);
    run on an H200 as `benchmarks/onpolicy_diff.py` (benchmarks/results/h200-*-onpolicy-diff.json)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sets = [x for o in SMALL for x in ("--set", o)]
    cmd = [sys.executable, str(root / "benchmarks" / "onpolicy_diff.py"), "--profile", "gsm8k-qwen2.5-0.5b-smoke"]
    done = subprocess.run([*cmd, *sets, "--cache", str(tmp_path / "cache")], capture_output=True, text=True)
    assert done.returncode == 0 and "EXACT" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_exact_attention_backward_is_the_per_sequence_gradient_and_repeats_bitwise():
    """Exact mode's attention: flashinfer's prefill forward (the engine's kernel) on the packed real tokens,
    and as its backward the gradient of one causal SDPA over the right-padded rows. The forward must be
    the per-sequence formula's (bf16 tolerance) and zero at the padding; the gradient the per-sequence
    formula's, zero at the padding, and the same bits on a second call (deterministic)."""
    from detrl.determinism import apply_process_settings
    from detrl.megatron.exact import attention_ref, pack, rope_attention, rope_ref, rope_table

    apply_process_settings(True, 0)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    lengths = [37, 63, 1, 79, 240]  # SmolLM2's heads: 9 query, 3 key/value, head_dim 64
    width = max(lengths)
    real = torch.arange(width, device=dev)[:, None] < torch.tensor(lengths, device=dev)[None, :]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    positions = torch.cat([torch.arange(n, device=dev) for n in lengths])
    table = rope_table(64, 10000.0, 4096, dev)
    rows = len(lengths)
    q = torch.randn(width, rows, 9, 64, device=dev, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(width, rows, 3, 64, device=dev, generator=g).bfloat16().requires_grad_() for _ in range(2))
    grad_out = torch.randn(width, rows, 9, 64, device=dev, generator=g).bfloat16()
    runs, outs = [], []
    for _ in range(2):
        out = rope_attention(q, k, v, lengths, table)
        outs.append(out.detach())
        runs.append(torch.autograd.grad(out, (q, k, v), grad_out))
    assert torch.equal(outs[0], outs[1]) and all(torch.equal(a, b) for a, b in zip(*runs))
    assert not outs[0][~real].any() and all(not x[~real].any() for x in runs[0])
    q32, k32, v32 = (pack(t.detach().float(), lengths).requires_grad_() for t in (q, k, v))
    ref = attention_ref(rope_ref(q32, positions, table), rope_ref(k32, positions, table), v32, bounds)
    assert torch.allclose(pack(outs[0], lengths).float(), ref.detach(), atol=5e-2, rtol=5e-2)
    want = torch.autograd.grad(ref, (q32, k32, v32), pack(grad_out, lengths).float())
    for got, exp in zip(runs[0], want):
        got = pack(got, lengths).float()
        assert torch.allclose(got, exp, atol=5e-2, rtol=5e-2), (got - exp).abs().max()


def test_the_ipc_transports_warm_up_builds_the_checksum_kernels_of_the_first_export():
    """Iteration 0's export computes SGLang's GPU checksum, whose Triton kernels are built on first use;
    `weight_sync.ipc.warm` (run while the engine self-tests) builds both of them beforehand. In a fresh
    process: none built before it, both after."""
    import subprocess
    import sys

    probe = (
        "from sglang.kernels.ops.memory import gpu_tensor_hash as h\n"
        "from detrl.weight_sync import ipc\n"
        "fns = (h.hash_tiles32_kernel_blocked, h.add_tree_reduce_u64_kernel)\n"
        "built = lambda: [any(c[0] for c in f.device_caches.values()) for f in fns]\n"
        "print(built()); ipc.warm(); print(built())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-3:-1] == ["[False, False]", "[True, True]"], done.stdout + done.stderr[-2000:]


def test_the_attention_module_built_ahead_is_in_the_workers_cache_and_found_there_the_second_time(tmp_path):
    """The builds the flow starts beside the conversion (detrl.rollout.attention_ahead), into an empty
    compile cache: flashinfer's attention module under the workers' flashinfer workspace and SGLang's
    store_cache kernel under their tvm-ffi cache, and a second build finds both. That the engine then uses
    them is the flow's record (scripts/gpu/proofs.sh `kernels`, and the capture's time in a cold flow)."""
    import json

    from detrl.rollout.attention_ahead import build

    model = tmp_path / "model"
    model.mkdir()
    smollm2 = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}
    (model / "config.json").write_text(json.dumps(smollm2))
    cfg, cache = load_config("gsm8k-smollm2-135m"), str(tmp_path / "compile")
    first, second = build(cfg, model, cache), build(cfg, model, cache)
    assert [r.status for r in first] == ["built", "built"], first
    assert [r.status for r in second] == ["found", "found"], second
    assert all(b.seconds < a.seconds for a, b in zip(first, second)), (first, second)
    name = "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_head_dim_qk_64"
    assert name in first[0].detail, first[0].detail
    built = list((tmp_path / "compile" / "flashinfer").rglob(f"cached_ops/{name}*/*.so"))
    assert len(built) == 1, built
    kv = list((tmp_path / "compile" / "tvm-ffi").rglob("sgl_kernel_jit_kvcache_384_384_*.so"))
    assert len(kv) == 1 and kv[0].stem in first[1].detail, (kv, first[1].detail)
