"""Rankings as artifacts: score variants on synthetic attention, stability, folders, the Hub path, doctor."""

import json

import pytest
import torch

from gaze.discovery import stability
from gaze.ranking import Ranking, RankingError
from gaze.regions import grid_layout, panel_regions
from gaze.scoring import variant_matrices
from gaze.strips import equal_panels

# six panels of 2 tokens each on a 1 x 12 grid, image tokens at positions 3..14 of a 16-token prompt
LAYOUT = grid_layout(3, (1, 12), (384, 32), (384, 32))
REGIONS = panel_regions(LAYOUT, equal_panels((384, 32), 6))
KV = 16


def synthetic_rows():
    """[L=1, Q=6, H=4, kv] rows: 0 sink head, 1 gaze head, 2 precise-but-faint head, 3 uniform head."""
    rows = torch.zeros(1, 6, 4, KV)
    for q in range(6):
        panel = LAYOUT.positions[REGIONS.token_indices(q)]
        rows[0, q, 0, 3] = 0.7  # sink: the corner token, whatever the question
        rows[0, q, 0, panel] += 0.025
        rows[0, q, 1, panel] = 0.05  # gaze: the queried panel
        rows[0, q, 1, LAYOUT.positions] += 0.0125
        rows[0, q, 2, panel] = 0.03  # faint but only on the queried panel
        rows[0, q, 3, LAYOUT.positions] = 0.5 / 12  # uniform over the image
    rows[..., 0] += 1 - rows.sum(-1)  # the rest on the first (text) token
    return rows


def test_variants_on_synthetic_attention():
    rows = synthetic_rows()
    assert torch.allclose(rows.sum(-1), torch.ones(1, 6, 4))
    norms = torch.ones(1, 6, 4, KV)
    norms[0, :, 1, LAYOUT.positions] = 0.0  # head 1's image values are zero: it moves nothing
    v = variant_matrices(rows, norms, LAYOUT, REGIONS)
    score = {name: torch.diagonal(m[0], dim1=-2, dim2=-1).mean(-1) for name, m in v.items()}  # [H]
    assert int(score["raw"].argmax()) == 0  # the sink head wins on raw mass ...
    assert int(score["sink_excluded"].argmax()) == 1  # ... and loses when sinks are excluded
    assert float(score["sink_excluded"][0]) < float(score["sink_excluded"][2])
    assert int(score["selectivity"].argmax()) == 2  # all of head 2's image mass is on the queried panel
    assert torch.allclose(score["selectivity"][2], torch.tensor(1.0))
    assert float(score["value_weighted"][1]) == 0.0  # attention to zero-norm values counts for nothing
    assert torch.allclose(score["raw"][3], torch.tensor(0.5 / 6))


def test_stability_on_known_data():
    same = torch.rand(1, 3, 4).expand(10, 3, 4).clone()  # every strip agrees
    s = stability(same, ks=(2, 5))
    assert torch.allclose(torch.tensor(s["ci_low"]), same[0]) and torch.allclose(torch.tensor(s["ci_high"]), same[0])
    assert s["half_overlap"] == {"2": 1.0, "5": 1.0}
    noisy = torch.randn(40, 2, 3, generator=torch.Generator().manual_seed(0))
    s = stability(noisy)
    low, high = torch.tensor(s["ci_low"]), torch.tensor(s["ci_high"])
    mean = noisy.mean(0)
    assert bool(((low <= mean) & (mean <= high)).all())
    assert 0.3 < float((high - low).mean()) < 1.0  # about 2 x 1.96 / sqrt(40) = 0.62 for unit noise


def _ranking():
    scores = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    return Ranking("tiny/model", scores, torch.rand(2, 4, 6, 6), 5, "q {ordinal}",
                   meta={"source": "comics/", "variant_scores": {"raw": scores.tolist()},
                         "stability": {"half_overlap": {"5": 0.8}}})


def test_ranking_folder_round_trip(tmp_path):
    r = _ranking()
    folder = r.save_pretrained(tmp_path / "rank", model_revision="abc", data_revision="def")
    for name in ("config.json", "scores.safetensors", "ranking.json", "README.md", "score_map.png", "top_matrices.png"):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_id"] == "tiny/model" and config["model_revision"] == "abc" and config["source_revision"] == "def"
    assert config["variant"] == "raw" and config["n_strips"] == 5 and config["prompt"] == "q {ordinal}"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny/model") and "score_map.png" in card and "top-5 overlap 80%" in card
    back = Ranking.from_pretrained(folder)
    assert torch.equal(back.scores, r.scores) and torch.equal(back.matrices, r.matrices) and back.top(8) == r.top(8)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(folder / "scores.safetensors"))["scores"], r.scores)


def test_push_and_pull_up_to_the_network(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        from pathlib import Path

        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kw)
        return "https://hub.example/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = _ranking().push_to_hub("me/tiny-gaze", private=True)
    assert url.endswith("/commit/1")
    assert calls["create"] == ("me/tiny-gaze", {"repo_type": "model", "private": True, "exist_ok": True})
    assert "ranking.json" in calls["upload"][1] and "README.md" in calls["upload"][1]

    saved = _ranking().save_pretrained(tmp_path / "snap")
    seen = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        seen["args"] = (repo_id, revision, allow_patterns)
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    back = Ranking.from_pretrained("me/tiny-gaze", revision="v1")
    assert seen["args"][:2] == ("me/tiny-gaze", "v1") and back.top(3) == _ranking().top(3)
    with pytest.raises(RankingError, match="hub id OWNER/NAME"):
        Ranking.from_pretrained(str(tmp_path / "missing" / "deeper"))


def test_discover_stores_variants_and_stability(loaded_qwen3, strip_for, tmp_path):
    from gaze.discovery import discover, summary

    strips = [strip_for(32, seed=s) for s in range(4)]
    r = discover(loaded_qwen3, strips, tmp_path / "run", progress=False)
    assert set(r.meta["variant_scores"]) == {"raw", "selectivity", "value_weighted", "sink_excluded"}
    assert torch.allclose(torch.tensor(r.meta["variant_scores"]["raw"]), r.scores)
    low, high = torch.tensor(r.meta["stability"]["ci_low"]), torch.tensor(r.meta["stability"]["ci_high"])
    assert bool((low <= r.scores + 1e-6).all() and (r.scores <= high + 1e-6).all())
    assert "top-K overlap between two halves" in summary(r)
    from gaze.discovery import merge

    sel = merge(tmp_path / "run", model_id=r.model_id, template=r.prompt, variant="selectivity")
    assert sel.method == "selectivity" and not torch.equal(sel.scores, r.scores)
    assert float(sel.scores.max()) <= 1.0 + 1e-6


def test_doctor_draws_the_grid(qwen3_path, strip_for, tmp_path, capsys):
    from gaze.cli import main

    strip_for(32, seed=3).image.save(tmp_path / "strip.png")
    rc = main(["doctor", "--model", str(qwen3_path), "--image", str(tmp_path / "strip.png"), "--out",
               str(tmp_path / "doc.png")])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "doc.png").exists()
    assert "24 image tokens" in out and "grid 2x12" in out and out.count(": 4 tokens") == 6
    from PIL import Image

    assert Image.open(tmp_path / "doc.png").size[0] >= 384
    rc = main(["doctor", "--model", str(qwen3_path), "--image", str(tmp_path / "strip.png"), "--box", "0,0,5,5",
               "--out", str(tmp_path / "doc2.png")])
    assert rc == 2 and "covers no image-token centre" in capsys.readouterr().err
