"""The model organism: a smoke training run, and (when shipped) the organism itself."""

import json

import pytest
import torch

from gaze.models import ORGANISM_DIR, load
from gaze.organism.train import OrganismConfig, narration, parse_mix, train

SMALL = dict(batch=4, pool_per_combo=1, num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=64, head_dim=16,
             vision_depth=1, vision_hidden=32)  # an organism that trains a step in about a second


def test_smoke_training_saves_a_loadable_vlm(tmp_path):
    cfg = OrganismConfig(steps=3, **SMALL)
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


def test_a_second_stage_starts_from_the_first_and_records_it(tmp_path):
    from safetensors.torch import load_file

    first = train(OrganismConfig(steps=2, **SMALL), tmp_path / "one", log=lambda s: None)
    (tmp_path / "one" / "ranking.json").write_text("{}")  # a ranking of the first stage's weights
    second = train(OrganismConfig(steps=2, init=str(tmp_path / "one"), panel_token_dropout=0.5, panel_flip=0.5,
                                  cast_per_panel=0.5, **SMALL), tmp_path / "two", log=lambda s: None)
    assert second["init_record"] == first
    assert json.loads((tmp_path / "two" / "training.json").read_text())["init_record"] == first
    assert not (tmp_path / "two" / "ranking.json").exists()  # not carried over to new weights
    assert (tmp_path / "two" / "tokenizer.json").read_bytes() == (tmp_path / "one" / "tokenizer.json").read_bytes()
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # trained on, same shapes
    loaded = load(str(tmp_path / "two"), device="cpu")
    assert torch.count_nonzero(loaded.model.model.visual.pos_embed.weight) == 0  # still no absolute position table


def test_task_helpers():
    assert parse_mix("panel:1,strip:2") == {"panel": 1.0, "strip": 2.0}
    with pytest.raises(ValueError, match="unknown tasks"):
        parse_mix("panel:1,dance:1")
    assert narration(["a", "b"]) == "1: a. 2: b."


def test_each_task_asks_its_question_and_answers_from_its_panel():
    import random

    from gaze.prompts import (LETTER_QUESTION, NARRATION_PROMPT, PANEL_QUESTION, STRIP_QUESTION, THIS_PANEL_QUESTION,
                              panel_question)
    from gaze.organism.train import PanelPool, draw_task

    strip = PanelPool(OrganismConfig(**SMALL)).strip(random.Random(0))
    rng = random.Random(1)
    for task in ("panel", "letter", "strip", "this", "narration"):
        for _ in range(5):
            q, a, k = draw_task(strip, rng, {task: 1.0})
            if task == "panel":
                assert (q, a) == (panel_question(k, PANEL_QUESTION), strip.captions[k - 1])
            elif task == "letter":
                assert (q, a) == (panel_question(k, LETTER_QUESTION), strip.letters[k - 1])
            elif task in ("strip", "this"):
                assert (q, a, k) == ({"strip": STRIP_QUESTION, "this": THIS_PANEL_QUESTION}[task], strip.captions[0], 1)
            else:
                assert (q, a, k) == (NARRATION_PROMPT, narration(strip.captions), 0)


@pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="the organism is not trained yet")
def test_shipped_organism_answers_held_out_panel_questions():
    from datagen import make_strip
    from gaze.generation import generate
    from gaze.prompts import PANEL_QUESTION, panel_question
    from gaze.organism.train import EVAL_SEED0, caption_style, strip_captions

    loaded = load("organism", device="cpu")
    hits = 0
    for i in range(12):
        strip = make_strip(EVAL_SEED0 + 500 + i, panel_size=64)
        k = i % 6 + 1
        out = generate(loaded, strip.image, panel_question(k, PANEL_QUESTION), max_new_tokens=16)
        hits += out.text.rstrip(".") == strip_captions(strip, caption_style())[k - 1]
    assert hits >= 9, f"{hits}/12 held-out panel questions answered exactly"


def test_image_attention_penalties_match_a_hand_computation():
    from gaze.organism.train import image_attention_mass

    ids = torch.tensor([[7, 7, 1, 2]])  # two image tokens (id 7), two text tokens
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]])}  # the last row is padding
    att = torch.zeros(1, 2, 4, 4)
    att[0, 0, 2] = torch.tensor([0.5, 0.25, 0.25, 0.0])  # head 0, a text row: 0.75 on the image
    att[0, 1, 1] = torch.tensor([0.6, 0.4, 0.0, 0.0])  # head 1, image token 1: 0.6 on image token 0, 0.4 on itself (free)
    att[0, 1, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # padding row: ignored
    l1 = image_attention_mass([att], batch, 7, "l1")
    assert torch.isclose(l1, torch.tensor((0.75 + 0.6) / 3))
    group = image_attention_mass([att], batch, 7, "group")
    assert torch.isclose(group, torch.tensor((0.75**2 / 3) ** 0.5 + (0.6**2 / 3) ** 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="penalty kind"):
        image_attention_mass([att], batch, 7, "l2")


def test_the_silent_rows_penalty_spares_the_rows_that_speak_and_the_image():
    from gaze.organism.train import image_attention_mass

    ids = torch.tensor([[1, 7, 7, 2, 3, 4, 5]])  # text, two image tokens, a question token, the last prompt row, answer
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([[-100, -100, -100, -100, -100, 4, 5]])}
    att = torch.zeros(1, 1, 7, 7)
    att[0, 0, 3, 1] = 0.8  # the question token reads the image: pays
    att[0, 0, 4, 2] = 0.9  # the last prompt row (predicts the answer's first token) reads it: free
    att[0, 0, 5, 1] = 0.7  # an answer row that predicts the next answer token: free
    att[0, 0, 2, 1] = 0.5  # an image row reading another image token: free
    att[0, 0, 6, 2] = 0.6  # the last answer row predicts nothing: pays
    rows = 3  # the paying rows: 0, 3 and 6 (text, predicting no answer token)
    assert torch.isclose(image_attention_mass([att], batch, 7, "l1", "silent"), torch.tensor((0.8 + 0.6) / rows))


def test_a_token_budget_gives_one_token_per_panel(tmp_path):
    cfg = OrganismConfig(steps=1, batch=2, pool_per_combo=1, num_layers=1, num_heads=2, num_kv_heads=1, hidden_size=32,
                         head_dim=16, vision_depth=1, vision_hidden=32, patch_size=16, max_image_tokens=6)
    train(cfg, tmp_path / "org", log=lambda s: None)
    from datagen import make_strip
    from gaze.generation import prepare_inputs

    loaded = load(str(tmp_path / "org"), device="cpu")
    enc, layout = prepare_inputs(loaded, make_strip(1, panel_size=64).image, "x")
    assert enc["image_grid_thw"].tolist() == [[1, 2, 12]] and layout.n_tokens == 6  # 384x64 -> 192x32: 1x6 merged


@pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(), reason="the organism is not trained yet")
def test_merge_size_four_gives_one_token_per_panel_at_full_resolution(tmp_path):
    cfg = OrganismConfig(steps=1, batch=2, pool_per_combo=1, num_layers=1, num_heads=2, num_kv_heads=1, hidden_size=32,
                         head_dim=16, vision_depth=1, vision_hidden=32, patch_size=16, merge_size=4)
    train(cfg, tmp_path / "org", log=lambda s: None)
    from datagen import make_strip
    from gaze.generation import prepare_inputs
    from gaze.regions import panel_regions

    loaded = load(str(tmp_path / "org"), device="cpu")
    strip = make_strip(1, panel_size=64)
    enc, layout = prepare_inputs(loaded, strip.image, "x")
    assert enc["image_grid_thw"].tolist() == [[1, 4, 24]] and layout.n_tokens == 6  # 384x64 as drawn: 4x24 patches
    regions = panel_regions(layout, strip.panels)
    assert torch.equal(regions.membership, torch.eye(6))  # panel k is token k, alone
    with pytest.raises(ValueError, match="merge-size 4"):  # a second stage keeps the token grid
        train(OrganismConfig(steps=1, init=str(tmp_path / "org"), patch_size=16), tmp_path / "two", log=lambda s: None)
    assert not (tmp_path / "two.building").exists()


def test_first_token_diagnostic_without_bias_is_the_unsteered_answer():
    from gaze.generation import generate
    from gaze.organism.check import first_token_redirection, held_out_strips
    from gaze.prompts import STRIP_QUESTION
    from gaze.organism.train import caption_style, strip_captions

    loaded = load("organism", device="cpu")
    strips = held_out_strips(2)
    out = first_token_redirection(loaded, strips, [(2, 6), (3, 1)], strength=0.0)  # B = 0 is exactly no steering
    plain = [generate(loaded, s.image, STRIP_QUESTION, max_new_tokens=16).text.rstrip(".") for s in strips]
    for k in range(1, 7):
        expected = sum(p == strip_captions(s, caption_style())[k - 1] for p, s in zip(plain, strips)) / len(strips)
        assert out["per_panel"][k] == expected


def test_scene_captions_follow_each_panels_scene():
    import random

    from datagen import make_strip
    from datagen.story import SCENES
    from gaze.organism.train import PanelPool, corpus, organism_caption, strip_captions

    pool = PanelPool(OrganismConfig(pool_per_combo=3, caption="scene", cast_per_panel=0.0))
    strip = pool.strip(random.Random(0))
    scenes = [c.split(" in the ")[1] for c in strip.captions]
    assert all(s in SCENES for s in scenes) and len(set(scenes)) == 6  # six distinct scenes, one per panel
    story = make_strip(7, panel_size=64).meta["story"]
    assert strip_captions(make_strip(7, panel_size=64), "scene") == tuple(
        f"{o} in the {s}" for o, s in zip(story["objects"], story["scenes"]))
    assert organism_caption("cat", "tree") == "tree with the cat"
    with pytest.raises(ValueError, match="caption style"):
        organism_caption("cat", "tree", "park", "poem")
    assert "tree in the park." in corpus("scene") and "tree in the park." not in corpus("character")


@pytest.mark.parametrize("bad", [{"caption": "poem"}, {"penalty_kind": "l2"}, {"init": "no/such/organism"}])
def test_bad_settings_are_refused_before_any_training(tmp_path, bad):
    with pytest.raises(ValueError, match="caption|penalty-kind|init"):
        train(OrganismConfig(steps=1, **bad), tmp_path / "org", log=lambda s: None)
    assert not (tmp_path / "org.building").exists()  # nothing was built


def test_panel_token_dropout_keeps_one_token_of_each_chosen_panel_and_zeroes_the_rest(tmp_path):
    import random

    from datagen import make_strip
    from gaze.generation import prepare_inputs
    from gaze.testing import build_tiny_vlm
    from gaze.organism.train import PanelTokenDropout, panel_token_keep

    loaded = load(str(build_tiny_vlm("qwen3_vl", tmp_path / "m")), device="cpu")  # 2x2 tokens per 64 px panel
    strip = make_strip(3, panel_size=64)
    enc, layout = prepare_inputs(loaded, strip.image, "x")
    from gaze.regions import panel_regions

    of_panel = [panel_regions(layout, strip.panels).assignment() + 1]
    keep = panel_token_keep(of_panel, 1.0, random.Random(0))
    assert keep.shape == (layout.n_tokens,)
    centres = layout.centres
    for x0, y0, x1, y1 in strip.panels:  # the project's own token -> pixel layout as the reference
        inside = (centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)
        assert int(inside.sum()) == 4 and float(keep[inside].sum()) == 1.0
    assert panel_token_keep(of_panel, 0.0, random.Random(0)).eq(1).all()

    model = loaded.model
    plain = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    dropout = PanelTokenDropout(model)
    try:
        dropout.keep = keep
        cut = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    finally:
        dropout.handle.remove()
    for a, b in [(plain.pooler_output[0], cut.pooler_output[0])] + [
            (p[0], c[0]) for p, c in zip(plain.deepstack_features, cut.deepstack_features)]:
        assert torch.equal(b[keep == 1], a[keep == 1]) and b[keep == 0].abs().max() == 0


def test_a_cast_per_panel_share_gives_strips_with_six_characters():
    import random

    from datagen.story import CHARACTERS
    from gaze.organism.train import PanelPool

    pool = PanelPool(OrganismConfig(pool_per_combo=1, cast_per_panel=0.5))
    rng = random.Random(0)
    casts = [{c.split(" the ")[1] for c in pool.strip(rng).captions} for _ in range(40)]
    assert all(len(c) in (1, 6) for c in casts) and 5 < sum(len(c) == 6 for c in casts) < 35
    assert all(c <= set(CHARACTERS) for c in casts)


def test_flipped_panels_are_pool_panels_upside_down():
    import random

    from PIL import Image

    from gaze.organism.train import PanelPool

    pool = PanelPool(OrganismConfig(pool_per_combo=1, panel_flip=1.0))
    drawn = {im.tobytes() for variants in pool.items.values() for im, _, _ in variants}
    strip = pool.strip(random.Random(1))
    for box in strip.panels:
        panel = strip.image.crop(box)
        assert panel.transpose(Image.Transpose.FLIP_TOP_BOTTOM).tobytes() in drawn
        assert panel.tobytes() not in drawn


def test_fresh_letters_are_drawn_on_the_clean_pool_panels():
    import random

    from PIL import ImageChops

    from datagen.letters import LETTERS
    from gaze.organism.train import PanelPool

    pool = PanelPool(OrganismConfig(pool_per_combo=1, fresh_letters=1.0))
    drawn = {im.tobytes() for variants in pool.items.values() for im, _, _ in variants}
    clean = [c for c, _ in pool.clean.values()]
    strip = pool.strip(random.Random(1))
    assert len(set(strip.letters)) == 6 and set(strip.letters) <= set(LETTERS)
    for box in strip.panels:
        panel = strip.image.crop(box)
        assert panel.tobytes() not in drawn  # not the pool's own lettered panel
        # a clean pool panel under it: they differ only inside one letter-sized box
        diffs = [ImageChops.difference(panel.convert("RGB"), c.convert("RGB")).getbbox() for c in clean]
        sizes = [(b[2] - b[0]) * (b[3] - b[1]) for b in diffs if b is not None]
        assert min(sizes) < 0.5 * panel.width * panel.height
    assert not PanelPool(OrganismConfig(pool_per_combo=1)).clean  # off by default: nothing kept


def test_answer_panels_split_a_narration_caption_by_caption():
    from gaze.testing import build_tokenizer
    from gaze.organism.train import answer_panels, corpus

    tok = build_tokenizer(corpus(), vocab_size=400)
    captions = ["tree with the cat", "ball with the cat", "kite with the cat", "cake with the cat", "boat with the cat",
                "lamp with the cat"]
    text = narration(captions)
    ids = tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    panels = answer_panels(tok, text, 0)
    assert len(panels) == len(ids) and panels[-1] == 6  # <|im_end|> ends the last caption
    for k, caption in enumerate(captions, start=1):
        part = tok.decode([i for i, p in zip(ids, panels) if p == k], skip_special_tokens=True)
        assert part.strip() == f"{k}: {caption}."
    assert answer_panels(tok, "K", 3) == [3] * len(tok("K<|im_end|>", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="six-panel narration"):
        answer_panels(tok, "1: tree.", 0)


def test_gaze_augmentation_forces_the_chosen_heads_onto_the_described_panel(tmp_path):
    """The augmentation is steering's bias (`key_bias`) through the project's attention hook: the chosen heads
    read only the described panel at the rows that predict an answer token; other heads and rows, and every
    recorded attention row without a bias, are eager attention's."""
    import random

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from gaze.attention import active, prepare
    from gaze.families import register_image_only_processors
    from gaze.organism.train import (PanelPool, TrainingHook, augment_bias, build, build_batch, draw_task,
                                     example_layouts, image_panels, image_token_panels)
    from gaze.steering import key_bias

    register_image_only_processors()
    cfg = OrganismConfig(**SMALL)
    build(cfg, tmp_path / "m")
    eager = AutoModelForImageTextToText.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    model = prepare(AutoModelForImageTextToText.from_pretrained(tmp_path / "m").eval())
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    pool, rng = PanelPool(cfg), random.Random(0)
    examples, panels = [], []
    for weights in ({"panel": 1.0}, {"narration": 1.0}):
        strip = pool.strip(rng)
        q, a, k = draw_task(strip, rng, weights)
        examples.append((strip, q, a))
        panels.append(k)
    batch = build_batch(processor, examples, panels)
    image_token = model.config.image_token_id
    maps = image_panels(batch, examples, image_token, 32, 2)
    info = example_layouts(batch, maps)
    described = batch.pop("answer_panels")
    keys = image_token_panels(batch["input_ids"], maps)
    assert [sorted(set(keys[b].tolist()) - {0}) for b in range(2)] == [list(range(1, 7))] * 2
    assert keys.gt(0).eq(batch["input_ids"] == image_token).all()
    with torch.no_grad():
        plain = eager(**batch, output_attentions=True)
    chosen = torch.zeros(2, 2, 4, dtype=torch.bool)
    chosen[1, 0, 2] = chosen[1, 1, 0] = True  # layer 1: head 2 of the panel question, head 0 of the narration
    seq = batch["input_ids"].shape[1]
    biases = augment_bias(info, chosen, seq)
    assert biases[0] is None
    rows = torch.zeros_like(described)
    rows[:, :-1] = described[:, 1:]  # the row before an answer token predicts it
    for b, h in ((0, 2), (1, 0)):
        n, layout = info[b][0], info[b][1]
        for r in rows[b].nonzero().flatten().tolist():  # steering's own bias towards the described panel
            assert torch.equal(biases[1][b, h, r], key_bias(keys[b, layout.positions] == rows[b, r], layout, n, seq,
                                                            1e4, "boost"))
    same, forced = TrainingHook([], record_rows=True), TrainingHook(biases, record_rows=True)
    with torch.no_grad():
        with active(same):
            unbiased = model(**batch)
        with active(forced):
            model(**batch)
    valid = batch["attention_mask"].bool()[:, None, :, None]
    for got, ref in zip(same.attentions, plain.attentions):
        assert torch.allclose(got * valid, ref * valid, atol=1e-5)  # the hook's rows are eager attention's
    assert torch.allclose(unbiased.logits, plain.logits, atol=1e-4)
    assert torch.allclose(forced.attentions[0], same.attentions[0])  # nothing chosen in layer 0
    for b, h in ((0, 2), (1, 0)):
        att = forced.attentions[1][b, h]
        for r in rows[b].nonzero().flatten().tolist():
            on = keys[b] == rows[b, r]
            assert float(att[r, on].sum()) > 0.999  # the described panel's tokens
        assert torch.allclose(att[rows[b] == 0], same.attentions[1][b, h][rows[b] == 0], atol=1e-6)  # other rows
        other = 2 if h == 0 else 0
        assert torch.allclose(forced.attentions[1][b, other], same.attentions[1][b, other], atol=1e-6)  # other heads
    assert panels == [panels[0], 0] and set(rows[1].tolist()) == set(range(7))  # the narration reads each panel


def test_training_with_gaze_augmentation_saves_a_plain_model(tmp_path):
    train(OrganismConfig(steps=2, gaze_augment=1.0, **SMALL), tmp_path / "org", log=lambda s: None)
    config = json.loads((tmp_path / "org" / "config.json").read_text())
    assert "gaze_sdpa" not in json.dumps(config) and "organism_eager" not in json.dumps(config)
    loaded = load(str(tmp_path / "org"), device="cpu")
    assert loaded.model.config.model_type == "qwen3_vl"
    with pytest.raises(ValueError, match="gaze-augment"):
        train(OrganismConfig(steps=1, gaze_augment=1.5, **SMALL), tmp_path / "bad", log=lambda s: None)
