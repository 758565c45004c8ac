"""detrl.megatron.layout, the one table of where tensors live: TP split dims, the TP gather of a stacked
fusion, and SGLang's fused names, each checked against an independent statement of Megatron's and
SGLang's layouts."""

import torch

from detrl.megatron.layout import TABLE, join_tp, sglang_layout, tp_partition_dim
from detrl.megatron.names import ArchMeta, _names

META = ArchMeta.from_hf_dict(
    {
        "model_type": "qwen2",
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 24,
        "vocab_size": 64,
        "tie_word_embeddings": False,
    }
)


def test_every_tensor_has_megatrons_tp_split():
    # Megatron: column-parallel (split outputs, dim 0): qkv, fc1, embeddings, output layer; row-parallel
    # (split inputs, dim 1): the attention projection and fc2; the norms replicated
    column = (
        "linear_qkv.weight",
        "linear_qkv.bias",
        "linear_fc1.weight",
        "word_embeddings.weight",
        "output_layer.weight",
    )
    row = ("linear_proj.weight", "linear_fc2.weight")
    names = [mc for mc, _, _ in _names(META)]
    assert len(names) == 3 + 2 * 7  # embeddings, final norm, output layer; 7 a layer with a QKV bias
    for n in names:
        want = 0 if n.endswith(column) else 1 if n.endswith(row) else None
        assert tp_partition_dim(n) == want, n
        assert tp_partition_dim("module." + n) == want  # under a wrapper's prefix too
    assert tp_partition_dim("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") is None


def test_the_tp_gather_of_a_stacked_fusion_undoes_megatrons_per_rank_split():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    whole = torch.cat([gate, up])  # [gate; up], the HF order the converters stack
    tp = 2
    shards = [torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]) for r in range(tp)]  # rank r: [gate_r; up_r]
    assert torch.equal(join_tp("decoder.layers.1.mlp.linear_fc1.weight", shards), whole)
    w = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(join_tp("decoder.layers.0.mlp.linear_fc2.weight", list(w.chunk(2, dim=1))), w)
    assert torch.equal(join_tp("decoder.layers.0.self_attention.linear_qkv.weight", list(w.chunk(3))), w)


def test_sglang_fuses_qkv_and_gate_up_per_layer_and_keeps_the_rest():
    named = {
        h.format(i): torch.full((2, 3), float(k + 10 * i))
        for k, lay in enumerate(TABLE.values())
        for h in lay.hf
        for i in (0, 1)
    }
    named = {k: v for k, v in named.items() if "{}" not in k}
    got = sglang_layout(named)
    for i in (0, 1):
        p = f"model.layers.{i}."
        qkv = [named[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        assert torch.equal(got[p + "self_attn.qkv_proj.weight"], torch.cat(qkv))
        assert torch.equal(
            got[p + "mlp.gate_up_proj.weight"],
            torch.cat([named[p + "mlp.gate_proj.weight"], named[p + "mlp.up_proj.weight"]]),
        )
        assert p + "self_attn.q_proj.weight" not in got and p + "mlp.up_proj.weight" not in got
        assert torch.equal(got[p + "mlp.down_proj.weight"], named[p + "mlp.down_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], named["model.embed_tokens.weight"])
    partial = {k: v for k, v in named.items() if "v_proj" not in k}  # an incomplete group is left unfused
    assert "model.layers.0.self_attn.q_proj.weight" in sglang_layout(partial)
