"""Per-token inspection: heat maps equal the recorded attention; a planted head peaks where it was planted."""

from dataclasses import dataclass

import torch

from gaze.attention import Hook, active
from gaze.generation import generate, regions_for
from gaze.tracking import Inspection, words_of

Q = "Describe this comic strip panel by panel."


def test_words_group_tokens():
    words = words_of(["the", " cat", " sle", "eps", ".", " 2", ":"])
    assert [w.text for w in words] == ["the", "cat", "sleeps.", "2:"]
    assert words[2].tokens == (2, 3, 4)


def test_heatmap_sums_to_the_tokens_image_mass(loaded_qwen3, strip_for):
    strip = strip_for(32, seed=4)
    out = generate(loaded_qwen3, strip.image, Q, max_new_tokens=6, track=[(0, 1), (1, 3)])
    ins = Inspection(out, regions_for(out.layout, strip.panels))
    raw = out.tracker.attention()  # [steps, heads, T]
    for t in range(len(out.token_ids)):
        hm = ins.heatmap(t)
        assert hm.shape == (2, 12)
        assert torch.allclose(hm.flatten(), raw[t].mean(0), atol=1e-6)  # equals the recorded attention
        assert torch.allclose(hm.sum(), ins.image_share()[t], atol=1e-6)
        assert torch.allclose(ins.heatmap(t, normalise=True).sum(), torch.tensor(1.0), atol=1e-5)


@dataclass
class Plant(Hook):
    layer: int
    head: int
    positions: list

    def bias(self, layer, query, key):
        if layer != self.layer:
            return None
        b = torch.zeros((1, query.shape[1], 1, key.shape[2]), dtype=query.dtype)
        b[0, self.head, 0, self.positions] = 20.0
        return b


def test_planted_head_heatmap_peaks_where_planted(loaded_qwen3, strip_for):
    strip = strip_for(32, seed=5)
    from gaze.generation import prepare_inputs
    from gaze.regions import panel_regions

    _, layout = prepare_inputs(loaded_qwen3, strip.image, Q)
    target = panel_regions(layout, strip.panels).token_indices(4)  # panel 5
    with active(Plant(1, 2, layout.positions[target].tolist())):
        out = generate(loaded_qwen3, strip.image, Q, max_new_tokens=4, track=[(1, 2)])
    ins = Inspection(out, regions_for(out.layout, strip.panels))
    for t in range(len(out.token_ids)):
        peak = int(ins.heatmap(t).flatten().argmax())
        assert peak in target.tolist()
        assert ins.region_of([t])[0] == 4


def test_cli_inspect_writes_answer_and_pictures(qwen3_path, strip_for, tmp_path, capsys):
    from gaze.cli import main
    from gaze.ranking import Ranking

    strip_for(32, seed=6).image.save(tmp_path / "s.png")
    Ranking(str(qwen3_path), torch.rand(2, 4), torch.zeros(2, 4, 6, 6), 1, "q").save(tmp_path / "r")
    rc = main(["inspect", "--model", str(qwen3_path), "--ranking", str(tmp_path / "r"), "--image",
               str(tmp_path / "s.png"), "--max-new-tokens", "5", "--top-k", "3", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "out" / "answer.html").exists() and (tmp_path / "out" / "words.png").exists()
    assert "MiB for 5 tokens" in out and "answer:" in out
