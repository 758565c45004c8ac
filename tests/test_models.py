"""Model acquisition: the seeded random generator, local checkpoints, and the hub code path
(`huggingface_hub.snapshot_download`) served from a cache the test builds, with the hub offline."""

import json
import shutil

import pytest

from detrl.config import ModelConfig, RandomModelSpec
from detrl.models import ModelError, fetch_model, qwen_tokenizer_dir, write_random_qwen2


def test_random_model_is_reproducible_and_seeded(tmp_path):
    spec = RandomModelSpec(seed=11)
    a = fetch_model(ModelConfig(source="random", name="t", random=spec), tmp_path / "a")
    b = fetch_model(ModelConfig(source="random", name="t", random=spec), tmp_path / "b")
    c = fetch_model(ModelConfig(source="random", name="t", random=RandomModelSpec(seed=12)), tmp_path / "a")
    assert a.sha256 == b.sha256
    assert a.sha256 != c.sha256
    cfg = json.loads((tmp_path / "a" / "models").joinpath(a.path.split("/")[-1], "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["vocab_size"] == 151936


def test_random_model_ships_the_real_qwen_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    path = write_random_qwen2(RandomModelSpec(), tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.decode(tok("Janet's ducks lay 16 eggs")["input_ids"]) == "Janet's ducks lay 16 eggs"
    assert (qwen_tokenizer_dir() / "tokenizer.json").exists()


def _fake_hub_cache(root, repo_id, src):
    """The cache layout huggingface_hub itself writes: models--org--name/{refs,snapshots}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return commit


def test_hub_code_path_with_a_populated_cache(tmp_path, monkeypatch):
    src = write_random_qwen2(RandomModelSpec(seed=2), tmp_path / "src")
    hub = tmp_path / "hub"
    commit = _fake_hub_cache(hub, "acme/tiny-qwen", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    art = fetch_model(ModelConfig(source="hub", name="acme/tiny-qwen"), tmp_path / "cache")
    assert art.path.endswith(commit)
    local = fetch_model(ModelConfig(source="local", name=str(src)), tmp_path / "cache")
    assert art.sha256 == local.sha256


def test_hub_failure_is_clear_and_early(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="could not download model 'nobody/nothing'.*model.source=local"):
        fetch_model(ModelConfig(source="hub", name="nobody/nothing"), tmp_path)
    assert not (tmp_path / "megatron").exists()


def test_local_checkpoint_validation(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        fetch_model(ModelConfig(source="local", name=str(tmp_path / "nope")), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        fetch_model(ModelConfig(source="local", name=str(tmp_path / "empty")), tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelError, match="model_type 'gpt2' is not supported"):
        fetch_model(ModelConfig(source="local", name=str(tmp_path / "gpt2")), tmp_path)


def test_hub_repo_id_shape_is_checked():
    from detrl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="not a hub repo id"):
        load_config("gsm8k-qwen2.5-0.5b", overrides=["model.name=/data/qwen"])
