"""HF <-> Megatron conversion: exact logits, exact round trip, and the cached torch_dist checkpoint."""

import json
import shutil

import pytest
import torch

from detrl.config import RandomModelSpec
from detrl.convert import convert_cached
from detrl.megatron.checkpoint import load_dist_checkpoint, load_hf_state
from detrl.megatron.model import attention_mask, build_gpt_model, load_state_exact
from detrl.megatron.names import ArchMeta, hf_to_megatron, megatron_to_hf
from detrl.megatron.parallel import model_parallel
from detrl.models import fetch_model, write_random_qwen2


def _llama_style(src, dst):
    """A Llama checkpoint (no qkv bias, untied) made from a Qwen2 one: same layout minus biases."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False)
    (dst / "config.json").write_text(json.dumps(cfg))
    state = {k: v for k, v in load_hf_state(dst).items() if not k.endswith("_proj.bias")}
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    tied = write_random_qwen2(RandomModelSpec(seed=3, tie_word_embeddings=True), d / "tied")
    untied = write_random_qwen2(RandomModelSpec(seed=4, tie_word_embeddings=False, num_layers=3), d / "untied")
    llama = _llama_style(untied, d / "llama")
    return {"tied": tied, "untied": untied, "llama": llama}


# each Megatron attention against the HF attention with the same kernels: local = eager, sdpa = sdpa
@pytest.mark.parametrize("attention,hf_attention", [("local", "eager"), ("sdpa", "sdpa")])
@pytest.mark.parametrize("kind", ["tied", "untied", "llama"])
def test_megatron_logits_equal_hf_logits_bitwise(checkpoints, kind, attention, hf_attention):
    from transformers import AutoModelForCausalLM

    path = checkpoints[kind]
    meta = ArchMeta.from_hf_dir(path)
    assert meta.tie_embeddings == (kind == "tied") and meta.qkv_bias == (kind != "llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=hf_attention).eval()
    ids = torch.randint(0, 151000, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    with model_parallel():
        model = build_gpt_model(meta, attention=attention).eval()
        load_state_exact(model, hf_to_megatron(load_hf_state(path), meta))
        s = ids.shape[1]
        mask = attention_mask(attention, s)
        with torch.no_grad():
            out = model(ids, torch.arange(s).expand(2, s), mask)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("kind", ["tied", "untied", "llama"])
def test_round_trip_is_bit_identical(checkpoints, kind):
    hf = load_hf_state(checkpoints[kind])
    meta = ArchMeta.from_hf_dir(checkpoints[kind])
    back = megatron_to_hf(hf_to_megatron(hf, meta), meta)
    assert set(back) == set(hf)
    for name, t in hf.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_round_trip_in_bf16(tmp_path):
    path = write_random_qwen2(RandomModelSpec(seed=5, dtype="bfloat16"), tmp_path / "bf16")
    hf = load_hf_state(path)
    assert next(iter(hf.values())).dtype == torch.bfloat16
    meta = ArchMeta.from_hf_dir(path)
    mc = {k: v.float() for k, v in hf_to_megatron(hf, meta).items()}  # the trainer's fp32 master copy
    back = megatron_to_hf(mc, meta)
    assert all(torch.equal(back[k].to(torch.bfloat16), hf[k]) for k in hf)


def test_interleaving_is_per_query_group():
    meta = ArchMeta.from_hf_dict(
        {
            "model_type": "qwen2",
            "num_hidden_layers": 1,
            "hidden_size": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 8,
            "vocab_size": 16,
            "tie_word_embeddings": True,
        }
    )
    d = meta.head_dim  # 2
    hf = {
        "model.embed_tokens.weight": torch.zeros(16, 8),
        "model.norm.weight": torch.ones(8),
        "model.layers.0.self_attn.q_proj.weight": torch.arange(8.0)[:, None].expand(8, 8).clone(),
        "model.layers.0.self_attn.k_proj.weight": 100 + torch.arange(4.0)[:, None].expand(4, 8).clone(),
        "model.layers.0.self_attn.v_proj.weight": 200 + torch.arange(4.0)[:, None].expand(4, 8).clone(),
        "model.layers.0.self_attn.o_proj.weight": torch.zeros(8, 8),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(8),
        "model.layers.0.mlp.gate_proj.weight": torch.zeros(8, 8),
        "model.layers.0.mlp.up_proj.weight": torch.ones(8, 8),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(8, 8),
    }
    for n in ("q", "k", "v"):
        hf[f"model.layers.0.self_attn.{n}_proj.bias"] = hf[f"model.layers.0.self_attn.{n}_proj.weight"][:, 0].clone()
    rows = hf_to_megatron(hf, meta)["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist()
    # group 0: q heads 0,1 (rows 0-3), k head 0, v head 0; then group 1
    assert rows == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert d == 2


def test_dist_checkpoint_is_cached_and_recovered_when_files_vanish(checkpoints, tmp_path):
    from detrl.config import ModelConfig

    art = fetch_model(ModelConfig(source="local", name=str(checkpoints["tied"])), tmp_path)
    conv = convert_cached(art, tmp_path)
    weights = tmp_path / "megatron" / (conv.path.split("/")[-1]) / "weights"
    stamp = (weights / ".metadata").stat().st_mtime_ns
    assert convert_cached(art, tmp_path).path == conv.path
    assert (weights / ".metadata").stat().st_mtime_ns == stamp  # a hit: not rewritten
    for f in weights.glob("*.distcp"):
        f.unlink()  # the cache entry lost its shards: must be converted again, not returned stale
    convert_cached(art, tmp_path)
    assert any(weights.glob("*.distcp"))
    meta = ArchMeta.from_hf_dir(checkpoints["tied"])
    with model_parallel():
        model = build_gpt_model(meta)
        load_dist_checkpoint(model, weights)
        expected = hf_to_megatron(load_hf_state(checkpoints["tied"]), meta)
        for name, t in model.state_dict().items():
            if not name.endswith("_extra_state"):
                assert torch.equal(t, expected[name]), name


def test_unsupported_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ArchMeta.from_hf_dict({"model_type": "gpt2"})
