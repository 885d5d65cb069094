"""Tests for moesurgeon.viz: PNGs are written and valid, the HTML embeds the data, shapes are checked."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from moesurgeon.viz import (
    conditional_coactivation,
    plot_coactivation,
    plot_layer_bars,
    plot_lines,
    plot_usage,
    write_usage_html,
)
from moesurgeon.viz.html_report import embedded_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _usage(groups: int, layers: int = 4, experts: int = 8, seed: int = 0) -> np.ndarray:
    raw = np.random.default_rng(seed).random((groups, layers, experts))
    return raw / raw.sum(-1, keepdims=True)


def _coact(layers: int, experts: int, seed: int = 0) -> np.ndarray:
    # counts of tokens selecting both i and j; diagonal = tokens selecting i
    rng = np.random.default_rng(seed)
    sel = rng.random((layers, 200, experts)) < 0.25
    return np.einsum("lti,ltj->lij", sel.astype(np.int64), sel.astype(np.int64))


def _assert_png(path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_plot_usage_writes_png(tmp_path, groups):
    names = ["code", "math", "chat"][:groups]
    out = plot_usage(_usage(groups), names, [f"L{i}" for i in range(4)], tmp_path / "sub" / "u.png", title="usage")
    assert out == tmp_path / "sub" / "u.png"
    _assert_png(out)


def test_plot_usage_explicit_diff_and_nan(tmp_path):
    usage = _usage(3)
    usage[0, 0, 0] = np.nan  # e.g. a layer that was not profiled: drawn grey, not an error
    _assert_png(plot_usage(usage, ["a", "b", "c"], list("0123"), tmp_path / "u.png", title="t", diff_of=(2, 0)))
    with pytest.raises(ValueError, match=r"diff_of=\(1, 1\)"):
        plot_usage(usage, ["a", "b", "c"], list("0123"), tmp_path / "x.png", title="t", diff_of=(1, 1))


def test_plot_usage_shape_errors(tmp_path):
    with pytest.raises(ValueError, match=r"got shape \(4, 8\)"):
        plot_usage(np.zeros((4, 8)), ["a"], list("0123"), tmp_path / "u.png", title="t")
    with pytest.raises(ValueError, match=r"shape \(2, 4, 8\).*got 1 group_names and 4 layer_names; expected 2 and 4"):
        plot_usage(_usage(2), ["a"], list("0123"), tmp_path / "u.png", title="t")
    with pytest.raises(ValueError, match=r"3 layer_names; expected 2 and 4"):
        plot_usage(_usage(2), ["a", "b"], list("012"), tmp_path / "u.png", title="t")


def test_conditional_coactivation_and_plot(tmp_path):
    counts = np.array([[10, 5, 0], [5, 20, 4], [0, 4, 0]])
    p = conditional_coactivation(counts)
    assert p[0, 1] == 0.5 and p[1, 0] == 0.25 and p[1, 2] == 0.2
    assert np.isnan(np.diag(p)).all() and np.isnan(p[2]).all()  # diagonal and never-selected row
    _assert_png(plot_coactivation(_coact(1, 8)[0], tmp_path / "c.png", title="co-activation"))
    with pytest.raises(ValueError, match=r"square .* got shape \(3, 4\)"):
        plot_coactivation(np.zeros((3, 4)), tmp_path / "c.png", title="t")
    with pytest.raises(ValueError, match="all-zero diagonal"):
        conditional_coactivation(np.ones((3, 3)) - np.eye(3))
    p2 = conditional_coactivation(np.ones((3, 3)) - np.eye(3), counts=np.array([2, 2, 4]))
    assert p2[2, 0] == 0.25


def test_plot_lines_and_bars(tmp_path):
    ks = [1, 2, 4, 8]
    out = plot_lines(ks, {"code": [9.0, 6.0, 5.0, 4.8], "math": [12.0, 8.0, 7.0, 6.9]}, tmp_path / "l.png",
                     xlabel="top-k", ylabel="perplexity", title="sweep", logy=True,
                     secondary={"tokens/s": [900, 700, 500, 300]}, secondary_ylabel="tokens/s")
    _assert_png(out)
    with pytest.raises(ValueError, match=r"series\['code'\] has 2 values but x has 4"):
        plot_lines(ks, {"code": [1.0, 2.0]}, tmp_path / "l.png", xlabel="k", ylabel="y", title="t")
    with pytest.raises(ValueError, match=r"secondary\['tps'\] has 1 values"):
        plot_lines(ks, {"a": ks}, tmp_path / "l.png", xlabel="k", ylabel="y", title="t", secondary={"tps": [1]})
    layers = [f"layer {i}" for i in range(6)]
    _assert_png(plot_layer_bars({"code": list(range(6)), "math": [1.0] * 6}, layers, tmp_path / "b.png",
                                ylabel="entropy (nats)", title="entropy"))
    with pytest.raises(ValueError, match=r"values\['code'\] has 2 entries but there are 6 layer_names"):
        plot_layer_bars({"code": [1, 2]}, layers, tmp_path / "b.png", ylabel="y", title="t")


def test_html_embeds_the_data(tmp_path):
    usage = _usage(3, layers=4, experts=8)
    usage[1, 2, 3] = np.nan
    coact = _coact(4, 8)
    tables = {"divergence": [{"layer": "L0", "js": np.float32(0.125), "n": np.int64(3)}, {"layer": "L1", "js": 0.5}]}
    out = write_usage_html(tmp_path / "r.html", title="Usage </script> & <b>", usage=usage,
                           group_names=["code", "math", "chat"], layer_names=[f"L{i}" for i in range(4)],
                           coact=coact, coact_layer=2, extra_tables=tables)
    page = out.read_text()
    assert "http://" not in page and "https://" not in page  # self-contained, nothing fetched
    assert "Usage &lt;/script&gt; &amp; &lt;b&gt;" in page
    data = embedded_data(page)
    assert data["title"] == "Usage </script> & <b>" and data["groups"] == ["code", "math", "chat"]
    assert data["coact_layer"] == 2  # the page opens on the layer of the co-activation PNG
    got = np.array(data["usage"], dtype=float)  # null -> nan
    np.testing.assert_allclose(got, usage, rtol=1e-5, equal_nan=True)
    assert np.array_equal(np.array(data["coact"]), coact)
    assert data["tables"]["divergence"][0] == {"layer": "L0", "js": 0.125, "n": 3}


def test_html_without_coact_and_shape_errors(tmp_path):
    out = write_usage_html(tmp_path / "r.html", title="t", usage=_usage(1), group_names=["all"],
                           layer_names=list("0123"))
    assert embedded_data(out.read_text())["coact"] is None
    with pytest.raises(ValueError, match=r"coact must have shape .*\(4, 8, 8\).*got shape \(4, 8\)"):
        write_usage_html(tmp_path / "r.html", title="t", usage=_usage(1), group_names=["all"],
                         layer_names=list("0123"), coact=np.zeros((4, 8)))
    with pytest.raises(ValueError, match=r"coact_layer=4: expected a layer position in \[0, 3\]"):
        write_usage_html(tmp_path / "r.html", title="t", usage=_usage(1), group_names=["all"],
                         layer_names=list("0123"), coact=_coact(4, 8), coact_layer=4)
    with pytest.raises(ValueError, match=r"got shape \(8,\)"):
        write_usage_html(tmp_path / "r.html", title="t", usage=np.zeros(8), group_names=[], layer_names=[])


def test_plot_expert_scores_marks_removed_and_checks_shapes(tmp_path):
    from moesurgeon.viz.score_heatmaps import plot_expert_scores

    rng = np.random.default_rng(0)
    tables = {"frequency": rng.random((3, 8)), "reap": rng.random((3, 8))}
    plain = plot_expert_scores(tables, ["L0", "L1", "L2"], tmp_path / "plain.png", title="scores")
    marked = plot_expert_scores(tables, ["L0", "L1", "L2"], tmp_path / "marked.png", title="scores",
                                removed={0: [1, 2], 2: [7]})
    _assert_png(plain)
    _assert_png(marked)
    # the crosses are drawn: the two images differ inside the panels
    a, b = imread(plain), imread(marked)
    assert a.shape[:2] != b.shape[:2] or not np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"\[layers, experts\]"):
        plot_expert_scores({"a": np.zeros((3, 8)), "b": np.zeros((3, 7))}, ["L0", "L1", "L2"], tmp_path / "x.png",
                           title="t")
    with pytest.raises(ValueError, match=r"removed\[0\]=\[8\]"):
        plot_expert_scores(tables, ["L0", "L1", "L2"], tmp_path / "y.png", title="t", removed={0: [8]})
