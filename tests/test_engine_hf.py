"""The reference engine: batch invariance, seed semantics, weight updates and their proof."""

import pytest
import torch

from detrl.config import HFEngineConfig
from detrl.rollout import SamplingParams
from detrl.rollout.hf import HFEngine, noise_seed, sample_token

PARAMS = SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=(151645,))
TARGET = list(range(1000, 1040))
OTHERS = [list(range(3000 + 97 * i, 3000 + 97 * i + 10 + 7 * i)) for i in range(8)]


@pytest.fixture(scope="module")
def engine(artifacts):
    return HFEngine(artifacts.model.path, HFEngineConfig())


def _target_in_batches(engine, seed, params=PARAMS):
    outs = []
    for bs in range(1, 9):
        pos = (bs - 1) // 2
        batch = OTHERS[: bs - 1]
        batch = batch[:pos] + [TARGET] + batch[pos:]
        seeds = [seed if i == pos else 77 + i for i in range(bs)]
        g = engine.generate(batch, seeds, params)[pos]
        outs.append((tuple(g.token_ids), torch.tensor(g.logprobs, dtype=torch.float32).numpy().tobytes()))
    return outs


def test_one_prompt_in_batches_of_1_to_8_gives_identical_ids_and_logprob_bytes(engine):
    outs = _target_in_batches(engine, seed=5)
    assert len({o[0] for o in outs}) == 1
    assert len({o[1] for o in outs}) == 1


def test_padded_batching_is_not_batch_invariant(artifacts):
    """The control: one padded batch (what generate() does) changes a prompt's bits with the batch."""
    padded = HFEngine(artifacts.model.path, HFEngineConfig(batching="padded"))
    outs = _target_in_batches(padded, seed=5)
    assert len({o[1] for o in outs}) > 1


def test_seed_semantics(engine):
    a = engine.generate([TARGET], [42], PARAMS)[0].token_ids
    assert a == engine.generate([TARGET], [42], PARAMS)[0].token_ids
    b = engine.generate([TARGET], [43], PARAMS)[0].token_ids
    assert a != b
    # a group: same prompt, consecutive seeds -> distinct samples
    group = engine.generate([TARGET] * 4, [100, 101, 102, 103], PARAMS)
    assert len({tuple(g.token_ids) for g in group}) == 4


def test_draw_depends_only_on_seed_and_position():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert sample_token(logits, 9, 17, 1.0, 1.0) == sample_token(logits.clone(), 9, 17, 1.0, 1.0)
    draws = {sample_token(logits, 9, pos, 1.0, 1.0)[0] for pos in range(40)}
    assert len(draws) > 10
    assert noise_seed(1, 2) != noise_seed(2, 1)


def test_unseeded_sampling_varies(engine):
    outs = {tuple(engine.generate([TARGET], None, PARAMS)[0].token_ids) for _ in range(3)}
    assert len(outs) > 1


def test_top_p_restricts_the_support():
    logits = torch.tensor([5.0, 4.0, -10.0, -10.0])
    draws = {sample_token(logits, s, 0, 1.0, 0.5)[0] for s in range(50)}
    assert draws == {0}


def test_logprobs_are_those_of_the_sampled_tokens(engine):

    g = engine.generate([TARGET], [3], SamplingParams(max_new_tokens=4))[0]
    seq = torch.tensor([TARGET + g.token_ids])
    with torch.no_grad():
        logits = engine.model(seq).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    ref = [lp[len(TARGET) - 1 + i, t].item() for i, t in enumerate(g.token_ids)]
    assert max(abs(a - b) for a, b in zip(ref, g.logprobs)) < 1e-5


def test_update_weights_and_proof(artifacts):
    from detrl.megatron.checkpoint import load_hf_state

    eng = HFEngine(artifacts.model.path, HFEngineConfig())
    state = load_hf_state(artifacts.model.path)
    assert eng.verify_weights(state) == []  # holds exactly the checkpoint
    name = "model.layers.0.mlp.down_proj.weight"
    new = torch.full_like(state[name], 0.5)
    eng.update_weights({name: new})
    assert eng.verify_weights(state) == [name]  # the proof names what changed
    assert eng.verify_weights({**state, name: new}) == []
    flipped = new.clone()
    flipped.view(-1)[7:8].view(torch.int32).__ixor__(1)  # one bit in the lowest mantissa place
    assert eng.verify_weights({**state, name: flipped}) == [name]
    assert eng.verify_weights({**state, "extra.weight": new})[-1] == "extra.weight (unknown to the engine)"
    with pytest.raises(KeyError, match="no parameters named"):
        eng.update_weights({"model.nope.weight": new})
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights({name: new[:1]})
