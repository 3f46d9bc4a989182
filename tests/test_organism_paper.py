"""The paper-geometry organism recipe (in development): its data, its auxiliary terms and its checks."""

import json
import random

import pytest
import torch

from gaze.organism import paper_check as check
from gaze.organism.paper import (PROMPTS, OrganismConfig, PanelPool, TrainingHook, answer_panels, augment_bias,
                                 build_batch, check_config, draw_task, narration, parse_mix, penalty_weights, train)

SMALL = dict(steps=2, batch=4, pool_per_combo=1, num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=64,
             head_dim=16, vision_depth=1, vision_hidden=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism") / "org"
    record = train(OrganismConfig(**SMALL), out, log=lambda s: None)
    return out, record


def test_smoke_training_saves_a_loadable_vlm_with_its_prompts(trained):
    from gaze.generation import generate
    from gaze.models import load

    out, record = trained
    assert json.loads((out / "prompts.json").read_text()) == PROMPTS
    assert record["config"]["steps"] == 2 and record["prompts"] == PROMPTS
    loaded = load(str(out), device="cpu")
    strip = check.held_out("1x6", 1)[0]
    g = generate(loaded, strip.image, PROMPTS["vqa"], max_new_tokens=3)
    assert len(g.token_ids) <= 3


@pytest.fixture(scope="module")
def pool():
    return PanelPool(OrganismConfig(**SMALL))


def test_training_strips_are_assembled_as_the_paper_does(pool):
    rng = random.Random(0)
    seen_grid = False
    for _ in range(40):
        s = pool.strip(rng)
        heights = {b[3] - b[1] for b in s.panels}
        assert len(heights) == 1  # one common height
        rows = sorted({b[1] for b in s.panels})
        seen_grid |= len(rows) == 2
        for a, b in zip(s.panels, s.panels[1:]):
            if a[1] == b[1]:  # same row: a gap of white between them
                assert b[0] - a[2] >= 5
                assert s.image.getpixel(((a[2] + b[0]) // 2, (a[1] + a[3]) // 2)) == (255, 255, 255)
    assert seen_grid


def test_datagen_paper_strips_keep_one_height_and_draw_their_widths():
    from datagen import make_strip

    s = make_strip(3, panel_size=64, gap=6, widths=(64, 112))
    widths = [b[2] - b[0] for b in s.panels]
    assert {b[3] - b[1] for b in s.panels} == {64} and all(64 <= w <= 112 for w in widths) and len(set(widths)) > 1
    assert [b[0] for b in s.panels[1:]] == [a[2] + 6 for a in s.panels[:-1]]
    assert s.image.size == (s.panels[-1][2], 64)
    again = make_strip(3, panel_size=64, gap=6, widths=(64, 112))
    assert again.panels == s.panels and list(again.image.getdata()) == list(s.image.getdata())
    # object boxes follow each panel's stretch
    for (x0, _, x1, _), objects in zip(s.panels, s.meta["object_boxes"]):
        for ob in objects:
            assert x0 <= ob["box"][0] < ob["box"][2] <= x1 + 1


def test_each_task_asks_its_question_and_answers_from_its_panel(pool):
    rng = random.Random(1)
    s = pool.strip(rng)
    weights = parse_mix("panel:1,short:1,vqa:1,this:1,narration:1,reverse:1,letter:1")
    seen = set()
    for _ in range(200):
        q, a, k = draw_task(s, rng, weights)
        if q.startswith("Read the comic in reverse"):
            seen.add("reverse")
            n = int(q.split(" panel from")[0][-3])
            assert k == 7 - n and a == s.captions[6 - n]
        elif q == PROMPTS["vqa"] or q == PROMPTS["static_narration"]:
            seen.add(q)
            assert (a, k) == (s.captions[0], 1)
        elif q == PROMPTS["narration"]:
            seen.add("narration")
            assert (a, k) == (narration(s.captions), 0)
        elif q.startswith("Which letter"):
            seen.add("letter")
            assert a == s.letters[k - 1]
        else:
            seen.add("panel")
            ordinal = q.split(" panel from")[0].split()[-1]
            assert a == s.captions[k - 1] and ordinal[0] == str(k)
            assert q in (PROMPTS["discovery"].format(ordinal=ordinal), PROMPTS["panel"].format(ordinal=ordinal))
    assert len(seen) == 6


def test_answer_panels_split_a_narration_description_by_description(trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained[0])
    caps = [f"ball with the cat{k}" for k in range(6)]
    text = narration(caps)
    labels = answer_panels(tok, text, 0)
    enc = tok(text + "<|im_end|>", add_special_tokens=False, return_offsets_mapping=True)
    for (start, _), p in zip(enc["offset_mapping"], labels):
        expected = max(k for k in range(1, 7) if k == 1 or text.find(f"Panel {k}:") <= start)
        assert p == expected
    assert answer_panels(tok, "tree with the cat", 4) == [4] * len(tok("tree with the cat<|im_end|>", add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def batch(trained, pool):
    from transformers import AutoProcessor

    from gaze.families import register_image_only_processors

    register_image_only_processors()

    processor = AutoProcessor.from_pretrained(trained[0])
    rng = random.Random(2)
    examples = []
    for task in ("panel", "narration", "vqa"):
        s = pool.strip(rng)
        examples.append((s, *draw_task(s, rng, {task: 1.0})))
    return processor, examples, *build_batch(processor, examples)


def test_augmentation_bias_is_steerings_key_bias_at_chosen_heads_and_answer_rows(batch):
    from gaze.steering import key_bias

    processor, examples, inputs, info = batch
    s = inputs["input_ids"].shape[1]
    chosen = torch.zeros(2, 3, 4, dtype=torch.bool)
    chosen[1, 0, 2] = chosen[1, 1, 0] = chosen[0, 1, 3] = True  # example 2 has none
    biases = augment_bias(info, chosen, s)
    for layer, b in enumerate(biases):
        assert b is not None and b.shape == (3, 4, s, s)
        for i, (n, layout, membership, described) in enumerate(info):
            for h in range(4):
                if not chosen[layer, i, h]:
                    assert not b[i, h].any()
                    continue
                for r in range(s):
                    p = int(described[r + 1]) if r + 1 < len(described) else 0
                    if p:  # row r predicts an answer token of panel p: steering's own bias towards p
                        assert torch.equal(b[i, h, r], key_bias(membership[p - 1], layout, n, s, 1e4, "boost"))
                    else:
                        assert not b[i, h, r].any()
    assert examples[1][3] == 0 and len(set(info[1][3].tolist()) - {0}) == 6  # the narration describes all six


def test_penalty_weights_spare_image_rows_padding_and_tax_the_rows_that_do_not_speak(batch):
    processor, examples, inputs, info = batch
    cfg = OrganismConfig(penalty=0.5, answer_penalty=0.1)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    w = penalty_weights(inputs, image_token, cfg)
    for i, (n, *_rest) in enumerate(info):
        length = int(inputs["attention_mask"][i].sum())
        for r in range(inputs["input_ids"].shape[1]):
            if r >= length or inputs["input_ids"][i, r] == image_token:
                expected = 0.0
            elif r + 1 < length and inputs["labels"][i, r + 1] != -100:
                expected = 0.1  # the last prompt row and the answer's rows
            else:
                expected = 0.5
            assert float(w[i, r]) == pytest.approx(expected)
        assert float(w[i, n - 1]) == pytest.approx(0.1)  # the last prompt row speaks


def test_the_training_hook_reads_eager_attention_and_its_penalty_is_the_hand_computed_mass(trained, batch):
    from transformers import AutoModelForImageTextToText

    from gaze.attention import active, prepare

    processor, examples, inputs, info = batch
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    eager = AutoModelForImageTextToText.from_pretrained(trained[0], attn_implementation="eager")
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True).attentions  # per layer [B, H, S, S]
    model = prepare(AutoModelForImageTextToText.from_pretrained(trained[0]))
    weights = penalty_weights(inputs, image_token, OrganismConfig(penalty=0.3, answer_penalty=0.02))
    keys = (inputs["input_ids"] == image_token).float()
    hook = TrainingHook([], weights, keys)
    got = []
    hook_record = hook.record
    hook.record = lambda layer, rows, value: (got.append(rows.detach()), hook_record(layer, rows, value))
    with torch.no_grad(), active(hook):
        model(**inputs)
    valid = inputs["attention_mask"].bool()
    expected = 0.0
    for a, b in zip(ref, got):
        assert torch.allclose(a[valid[:, None, :, None].expand_as(a)], b[valid[:, None, :, None].expand_as(b)], atol=1e-5)
        s = a.shape[-1]
        mass = (a.sum(1) * keys[:, None, :] * (1 - torch.eye(s))).sum(-1)
        expected += float((mass * weights).sum()) / a.shape[0]
    assert float(hook.penalty) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("bad", [{"mix": "panel:1,poem:1"}, {"min_width": 32}, {"grid_share": 1.5},
                                 {"vision_pos_embed": "sine"}, {"gaze_augment_heads": 0}])
def test_bad_settings_are_refused_before_any_training(tmp_path, bad):
    with pytest.raises(ValueError):
        check_config(OrganismConfig(**{**SMALL, **bad}))
    with pytest.raises(ValueError):
        train(OrganismConfig(**{**SMALL, **bad}), tmp_path / "never")
    assert not (tmp_path / "never.building").exists()


def test_described_panels_follow_the_panel_markers():
    pieces = ["Panel", " 1", ":", " ball", " with", ".", " Panel", " 2", ":", " tree", "."]
    assert check.described_panels(pieces) == [0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]


def test_mechanism_table_reads_the_top_heads_matrices():
    from gaze.ranking import Ranking

    m = torch.zeros(2, 2, 6, 6)
    m[1, 0] = torch.eye(6) * 0.6 + 0.02  # a gaze head
    m[0, 1] = torch.full((6, 6), 0.3)  # reads the image, not the queried panel
    scores = torch.diagonal(m, dim1=-2, dim2=-1).mean(-1)
    r = Ranking("x", scores, m, 3, "q")
    out = check.mechanism(r, k=1)
    assert out["heads"] == [(1, 0)] and out["diagonal_everywhere"] and out["top_score"] == pytest.approx(0.62)
    assert not check.mechanism(r, k=2)["diagonal_everywhere"]  # averaging in the flat head: 0.46 vs 0.16
