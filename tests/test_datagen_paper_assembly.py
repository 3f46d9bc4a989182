"""datagen's --max-width: strips assembled as the paper does, off the token grid."""

import pytest

from datagen import DatagenError, GenerateConfig, run
from gaze.strips import load_strips


def test_max_width_draws_each_panel_its_own_width_at_one_height_with_the_gap(tmp_path):
    out = tmp_path / "strips"
    run(GenerateConfig(out=str(out), n_strips=5, eval_fraction=0.2, gap=6, align=0, max_width=112), progress=False)
    widths = set()
    for strip in load_strips(str(out), split="discovery"):
        assert {b[3] - b[1] for b in strip.panels} == {64} and strip.image.size[1] == 64
        assert [b[0] - a[2] for a, b in zip(strip.panels, strip.panels[1:])] == [6] * 5
        widths |= {b[2] - b[0] for b in strip.panels}
    assert min(widths) >= 64 and max(widths) <= 112 and len(widths) > 3


@pytest.mark.parametrize("kw, words", [(dict(gap=0, max_width=112), "--align 0"),
                                       (dict(gap=6, align=0, max_width=40), "narrower than --panel-size")])
def test_max_width_refuses_a_token_grid_and_a_width_below_the_height(tmp_path, kw, words):
    with pytest.raises(DatagenError, match=words):
        run(GenerateConfig(out=str(tmp_path / "never"), n_strips=5, **kw), progress=False)
    assert not (tmp_path / "never").exists()
