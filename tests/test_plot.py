"""detrl.plot: the per-iteration curves as one PNG, A over B, the first divergence marked."""

from detrl.plot import curves_png, data_uri

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_curves_are_a_png_with_and_without_a_marked_divergence():
    stats = [{"mean_reward": 0.1 * i, "loss": 1.0 - 0.1 * i, "eval_accuracy": 0.5} for i in range(4)]
    plain = curves_png({"A": stats, "B": stats}, title="t")
    marked = curves_png({"A": stats, "B": stats[:2]}, title="t", diverged_at=(2, "rollout_tokens"))
    assert plain.startswith(PNG) and marked.startswith(PNG) and plain != marked
    assert data_uri(plain).startswith("data:image/png;base64,iVBORw0KGgo")
