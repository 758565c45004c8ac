"""A run's inputs: a conversion still running (`Converting`) is waited for once, its failure named, and
its path is the one the finished conversion writes."""

import pytest

from detrl.artifacts import Artifacts, ConversionFailed, Converting, converting
from detrl.convert import ConvertedArtifact, converted_dir
from detrl.data import DatasetArtifact
from detrl.models import ModelArtifact
from detrl.ray.errors import RunError


def _model() -> ModelArtifact:
    return ModelArtifact(path="/m", sha256="ab" * 32, source="local", name="m", revision="r")


def _arts(result) -> Artifacts:
    data = DatasetArtifact(path="/d", sha256="cd" * 32, rows=1, source="local", name="d")
    return Artifacts(_model(), data, converting(_model(), "/cache", result))


def test_the_checkpoint_is_named_before_the_conversion_ends_and_is_where_it_writes():
    arts = _arts(lambda: pytest.fail("naming the checkpoint must not wait for the conversion"))
    assert arts.checkpoint == str(converted_dir(_model(), "/cache") / "weights")


def test_the_conversion_is_waited_for_once_and_then_is_the_artifact():
    calls = []
    done = ConvertedArtifact(
        path=str(converted_dir(_model(), "/cache")), hf_sha256="ab" * 32, converter_version="1", dtype="float32"
    )
    arts = _arts(lambda: calls.append(1) or done)
    assert arts.converted() == done and arts.converted() == done
    assert arts.megatron == done and calls == [1]


def test_a_failed_conversion_is_named_and_is_not_a_retriable_worker_crash():
    def fail():
        raise OSError("disk full")

    with pytest.raises(ConversionFailed, match="conversion this run waits for failed: disk full") as e:
        _arts(fail).converted()
    assert isinstance(e.value, RunError)  # tasks.loop retries a worker crash, never a RunError


def test_a_conversion_written_elsewhere_is_refused():
    other = ConvertedArtifact(path="/elsewhere", hf_sha256="ab" * 32, converter_version="1", dtype="float32")
    with pytest.raises(ConversionFailed, match="wrote /elsewhere"):
        _arts(lambda: other).converted()
    assert isinstance(_arts(lambda: other).megatron, Converting)
