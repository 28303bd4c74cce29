"""Share heatmap: a valid PNG of the documented size; a clear message when matplotlib is missing."""

import sys

import pytest

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.tools import plotting

SHARES = {
    "self_attn.q_proj": {0: [0.2, 0.8, 0.0], 1: [0.5, 0.25, 0.25], 2: [1.0, 0.0, 0.0]},
    "mlp.down_proj": {0: [0.1, 0.1, 0.8], 1: [0.3, 0.3, 0.4], 2: [0.0, 0.5, 0.5]},
}
MODELS = ["/models/base", "/models/code-ft/", "math"]


def test_heatmap_png_has_the_expected_size(tmp_path):
    import matplotlib.image as image  # a test dependency: fail, never skip, when absent

    out = plotting.plot_share_heatmap(SHARES, MODELS, str(tmp_path / "sub" / "share.png"), dpi=50)
    pixels = image.imread(out)  # raises on anything that is not a valid PNG
    height, width = pixels.shape[:2]
    # two panels of 3.2 x 4.0 inches at 50 dpi, computed by hand
    assert (width, height) == (320, 200)
    assert plotting.figure_pixels(2, dpi=50) == (320, 200)
    assert pixels[..., :3].std() > 0.05  # something was drawn
    with open(out, "rb") as fp:
        assert fp.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_panel_default_size_and_layer_none(tmp_path):
    import matplotlib.image as image  # a test dependency: fail, never skip, when absent

    out = plotting.plot_share_heatmap(
        {"embed_tokens": {None: [0.6, 0.4]}}, ["a", "b"], str(tmp_path / "p.png")
    )
    height, width = image.imread(out).shape[:2]
    assert (width, height) == (round(3.2 * 100), round(4.0 * 100))


def test_bad_share_rows_and_empty_input(tmp_path):
    with pytest.raises(ValueError, match="2 shares for 3 models"):
        plotting.plot_share_heatmap({"m": {0: [0.5, 0.5]}}, MODELS, str(tmp_path / "x.png"))
    with pytest.raises(FisherInputError, match="nothing to plot"):
        plotting.plot_share_heatmap({}, MODELS, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(FisherInputError) as info:
        plotting.plot_share_heatmap(SHARES, MODELS, str(tmp_path / "x.png"))
    assert "pip install 'mergekit-fisher[plot]'" in str(info.value)
    assert info.value.exit_code == 2
    assert not (tmp_path / "x.png").exists()
