"""The model organism: a smoke training run, and (when shipped) the organism itself."""

import json

import pytest
import torch

from gaze.models import ORGANISM_DIR, load
from gaze.train_organism import OrganismConfig, narration, parse_mix, train


def test_smoke_training_saves_a_loadable_vlm(tmp_path):
    cfg = OrganismConfig(steps=3, batch=4, pool_per_combo=1, num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=64,
                         head_dim=16, vision_depth=1, vision_hidden=32)
    record = train(cfg, tmp_path / "org", log=lambda s: None)
    assert record["config"]["steps"] == 3 and record["final_loss"] > 0
    loaded = load(str(tmp_path / "org"), device="cpu")  # the real from_pretrained path, offline
    assert loaded.model.config.model_type == "qwen3_vl"
    assert torch.count_nonzero(loaded.model.model.visual.pos_embed.weight) == 0  # no absolute position table
    from datagen import make_strip
    from gaze.generation import generate

    out = generate(loaded, make_strip(5, panel_size=64).image, "What is happening in the 2nd panel from the left?",
                   max_new_tokens=3)
    assert len(out.token_ids) <= 3
    assert json.loads((tmp_path / "org" / "training.json").read_text())["config"]["seed"] == 0


def test_task_helpers():
    assert parse_mix("panel:1,strip:2") == {"panel": 1.0, "strip": 2.0}
    with pytest.raises(ValueError, match="unknown tasks"):
        parse_mix("panel:1,dance:1")
    assert narration(["a", "b"]) == "1: a. 2: b."


@pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="the organism is not trained yet")
def test_shipped_organism_answers_held_out_panel_questions():
    from datagen import make_strip
    from gaze.generation import generate
    from gaze.prompts import PANEL_QUESTION, panel_question
    from gaze.train_organism import EVAL_SEED0, strip_captions

    loaded = load("organism", device="cpu")
    hits = 0
    for i in range(12):
        strip = make_strip(EVAL_SEED0 + 500 + i, panel_size=64)
        k = i % 6 + 1
        out = generate(loaded, strip.image, panel_question(k, PANEL_QUESTION), max_new_tokens=16)
        hits += out.text.rstrip(".") == strip_captions(strip)[k - 1]
    assert hits >= 9, f"{hits}/12 held-out panel questions answered exactly"
