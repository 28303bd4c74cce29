"""The share map: its grid from a report (rows in plan order, outside-block groups spanning),
a valid PNG of the documented size, numbers in every cell, and a clear message without
matplotlib."""

import sys

import numpy as np
import pytest

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.tools import plotting
from mergekit_fisher.tools.share_map import share_map, short_labels

MODELS = ["math", "code", "chat"]


def group(layer, module, shares, floor=0.0):
    return {
        "layer": layer,
        "module": module,
        "shares": dict(zip(MODELS, shares)),
        "floor_fraction": floor,
        "none_kept_fraction": None,
        "elements": 4,
    }


REPORT = {
    "merge_method": "fisher",
    "share_of": "fisher_mass",
    "models": MODELS,
    "groups": [
        group(None, "embed_tokens", [0.2, 0.3, 0.5]),
        group(0, "self_attn.q_proj", [0.4, 0.4, 0.2], floor=0.25),
        group(0, "mlp.down_proj", [0.1, 0.1, 0.8]),
        group(1, "self_attn.q_proj", [0.3, 0.3, 0.4]),
        group(None, "lm_head", [1.0, 0.0, 0.0]),
    ],
}


def test_grid_from_report():
    data = share_map(REPORT)
    assert data.rows == ["embed_tokens", "layer 0", "layer 1", "lm_head"]
    assert data.spanning == [True, False, False, True]
    assert data.modules == ["self_attn.q_proj", "mlp.down_proj"]
    assert data.columns == ["q", "down"]
    np.testing.assert_allclose(data.shares[2, 0], [0.5, 0.5])  # embed_tokens, across the row
    np.testing.assert_allclose(data.shares[:, 1, 0], [0.4, 0.4, 0.2])
    assert np.isnan(data.shares[0, 2, 1])  # layer 1 has no down_proj here
    assert data.floor[1, 0] == 0.25
    assert data.centre == pytest.approx(1 / 3)
    assert data.spread == pytest.approx(1 - 1 / 3)  # lm_head's 1.0 is the largest deviation


def test_near_equal_shares_get_a_narrow_scale():
    report = dict(REPORT, groups=[group(0, "q", [0.36, 0.32, 0.32])])
    assert share_map(report).spread == pytest.approx(0.36 - 1 / 3)


def test_short_labels_stay_unique():
    assert short_labels(["mlp.experts.*.w1", "shared_expert.w1", "self_attn.o_proj"]) == [
        "experts.*.w1",
        "shared_expert.w1",
        "o",
    ]
    assert short_labels(["input_layernorm", "post_attention_layernorm"]) == [
        "input_norm",
        "post_attn_norm",
    ]


def test_png_size_and_printed_numbers(tmp_path):
    import matplotlib.image as image  # a test dependency: fail, never skip, when absent

    data = share_map(REPORT)
    out, printed = plotting.plot_share_map(data, str(tmp_path / "sub" / "share.png"), dpi=50)
    pixels = image.imread(out)  # raises on anything that is not a valid PNG
    height, width = pixels.shape[:2]
    inches = plotting.figure_inches(data)
    assert abs(width - inches[0] * 50) <= 1 and abs(height - inches[1] * 50) <= 1
    # 3 model panels + the floor, each of 2 + 3 cells (layer 1 has no down_proj: left blank)
    assert len(printed) == 4 * 5
    title = next(key[0] for key in printed if key[0].startswith("chat"))
    assert printed[(title, "embed_tokens", "*")] == ".500"
    assert printed[(title, "layer 0", "down")] == ".800"
    lm_title = next(key[0] for key in printed if key[0].startswith("math"))
    assert printed[(lm_title, "lm_head", "*")] == "1.00"
    floor_title = next(key[0] for key in printed if key[0].startswith("floor"))
    assert printed[(floor_title, "layer 0", "q")] == "25%"
    assert pixels[..., :3].std() > 0.05  # something was drawn


def test_panel_height_grows_with_layers_only():
    many = dict(REPORT, groups=[group(i, "q", [0.3, 0.3, 0.4]) for i in range(80)])
    few = dict(REPORT, groups=[group(i, "q", [0.3, 0.3, 0.4]) for i in range(2)])
    (w80, h80), (w2, h2) = (plotting.figure_inches(share_map(r)) for r in (many, few))
    assert w80 == w2 and h80 - h2 == pytest.approx(78 * plotting.CELL[1])


def test_empty_input(tmp_path):
    with pytest.raises(FisherInputError, match="nothing to plot"):
        plotting.plot_share_map(share_map(dict(REPORT, groups=[])), str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(FisherInputError) as info:
        plotting.plot_share_map(share_map(REPORT), str(tmp_path / "x.png"))
    assert "pip install 'mergekit-fisher[plot]'" in str(info.value)
    assert info.value.exit_code == 2
    assert not (tmp_path / "x.png").exists()
