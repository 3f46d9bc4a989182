"""The model organism recipe: its data, its auxiliary terms and its checks; and the shipped organism itself."""

import json
import math
import random

import pytest
import torch

from datagen.story import CHARACTERS, OBJECTS
from gaze.organism import check
from gaze.organism.train import (PROMPTS, READOUT, OrganismConfig, PanelPool, PromptIds, TrainingHook, answer_panels,
                                 augment_bias, blinding, build_batch, cache_features, check_config, draw_task,
                                 focus_weights, narration, parse_mix, row_targets, readout_loss, readout_loss_and_hits, penalty_weights, prepare, readout_targets,
                                 silent_rows, train)

SMALL = dict(steps=2, unmask_steps=2, batch=4, pool_strips=8, vision_steps=2, vision_batch=4, pool_per_combo=1,
             num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=64, head_dim=16, vision_depth=1, vision_hidden=32,
             letter_steps=2, letter_batch=2)


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
    weights = parse_mix("panel:1,short:1,vqa:1,this:1,narration:1,reverse:1,letter:1,reverse_letter:1")
    seen = set()
    for _ in range(200):
        q, a, k = draw_task(s, rng, weights)
        if q.startswith("Read the comic in reverse, which letter"):  # the letter of the n-th panel from the right
            seen.add("reverse_letter")
            n = int(q.split(" panel?")[0][-3])
            assert q == PROMPTS["reverse_letter"].format(ordinal=q.split(" panel?")[0].split()[-1])
            assert k == 7 - n and a == s.letters[6 - n]
        elif q.startswith("Read the comic in reverse"):
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
    assert len(seen) == 7


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


def test_the_separator_space_can_open_the_next_description(trained):
    """`separator="next"`: the whitespace-only token between a full stop and "Panel k:" is labelled k (so the
    row at the full stop, which predicts it, is the next panel's); every other token keeps its label."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained[0])
    text = narration([f"ball with the cat{k}" for k in range(6)])
    enc = tok(text + "<|im_end|>", add_special_tokens=False, return_offsets_mapping=True)
    before, after = answer_panels(tok, text, 0), answer_panels(tok, text, 0, "next")
    moved = 0
    for (start, end), b, a in zip(enc["offset_mapping"], before, after):
        opens = next((k for k in range(2, 7) if text.find(f"Panel {k}:") == end), None)
        if text[start:end].isspace() and opens is not None:
            assert (b, a) == (opens - 1, opens)
            moved += 1
        else:
            assert a == b
    assert moved == 5  # one separator before each of "Panel 2:" .. "Panel 6:"
    assert answer_panels(tok, "tree with the cat", 4, "next") == answer_panels(tok, "tree with the cat", 4)
    with pytest.raises(ValueError, match="separator"):
        answer_panels(tok, text, 0, "both")


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
        examples.append((prepare(processor, s), *draw_task(s, rng, {task: 1.0})))
    return processor, examples, *build_batch(PromptIds(processor), examples)


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


def test_even_augmentation_weighs_the_described_panels_tokens_equally_at_forced_rows_only(batch):
    """`--gaze-augment-weights even`: a forced head's row attends to exactly the described panel's image tokens,
    each equally, whatever its scores; rows and heads the augmentation does not force keep their own scores."""
    processor, examples, inputs, info = batch
    s = inputs["input_ids"].shape[1]
    chosen = torch.zeros(2, 3, 4, dtype=torch.bool)
    chosen[1, 0, 2] = chosen[1, 1, 0] = chosen[1, 2, 3] = True
    (_, boost) = augment_bias(info, chosen, s)
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(3, 4, s, 16, generator=g), torch.randn(3, 2, s, 16, generator=g)
    hook = TrainingHook([None, boost], None, torch.zeros(3, s), even=1e4)
    assert hook.bias(0, query, key) is None
    from gaze.attention import attention_scores

    scores = attention_scores(query, key, 16 ** -0.5)
    assert torch.allclose(scores[:, 1], query[:, 1] @ key[:, 0].transpose(-1, -2) / 4)  # heads 0-1 share kv head 0
    causal = torch.full((s, s), float("-inf")).triu(1)
    weights = torch.softmax(scores + hook.bias(1, query, key) + causal, dim=-1)
    plain = torch.softmax(scores + causal, dim=-1)
    forced_rows = 0
    for i, (n, layout, membership, described) in enumerate(info):
        for h in range(4):
            for r in range(s - 1):
                p = int(described[r + 1]) if r + 1 < len(described) else 0
                if chosen[1, i, h] and p:
                    keys = layout.positions[membership[p - 1]]
                    expected = torch.zeros(s)
                    expected[keys] = 1 / len(keys)
                    assert torch.allclose(weights[i, h, r], expected, atol=1e-6)
                    forced_rows += 1
                else:
                    assert torch.allclose(weights[i, h, r], plain[i, h, r], atol=1e-6)
    assert forced_rows >= 3


def test_penalty_weights_and_blinding_touch_only_the_text_rows_that_do_not_speak(batch):
    processor, examples, inputs, info = batch
    cfg = OrganismConfig(penalty=0.5)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    w = penalty_weights(inputs, image_token, cfg)
    blind = blinding(inputs, image_token)  # [B, 1, S, S]
    image = inputs["input_ids"] == image_token
    for i, (n, *_rest) in enumerate(info):
        length = int(inputs["attention_mask"][i].sum())
        for r in range(inputs["input_ids"].shape[1]):
            if r >= length or inputs["input_ids"][i, r] == image_token:
                expected = 0.0
            elif r + 1 < length and inputs["labels"][i, r + 1] != -100:
                expected = 0.0  # the last prompt row and the answer's rows speak
            else:
                expected = 0.5
            assert float(w[i, r]) == pytest.approx(expected)
            # blinded: exactly the silent rows, towards exactly the image keys
            row = blind[i, 0, r]
            assert torch.equal(row != 0, image[i] & (expected > 0))
        assert float(w[i, n - 1]) == 0.0 and not blind[i, 0, n - 1].any()  # the last prompt row speaks
        assert float(w[i, n - 2]) == 0.5  # the token before it does not


def test_blinded_silent_rows_read_no_image_and_the_rows_that_speak_are_unchanged(trained, batch):
    from transformers import AutoModelForImageTextToText

    from gaze.attention import active, prepare as prepare_attention

    processor, examples, inputs, info = batch
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    model = prepare_attention(AutoModelForImageTextToText.from_pretrained(trained[0]))
    keys = (inputs["input_ids"] == image_token).float()
    rows = {}

    class Rows(TrainingHook):
        def record(self, layer, r, value):
            rows[layer] = r.detach()

    with torch.no_grad(), active(Rows([], torch.ones_like(keys), keys, blinding(inputs, image_token))):
        model(**inputs)
    silent = silent_rows(inputs, image_token).bool()
    for layer, r in rows.items():  # [B, H, S, S]
        mass = (r * keys[:, None, None, :]).sum(-1)  # [B, H, S]
        assert float(mass.permute(0, 2, 1)[silent].abs().max()) < 1e-6
        assert float(mass.permute(0, 2, 1)[~silent & inputs["attention_mask"].bool()].max()) > 1e-3


def test_cached_tower_outputs_give_the_same_logits_as_the_pixels(trained, batch):
    from transformers import AutoModelForImageTextToText

    processor, examples, inputs, info = batch
    model = AutoModelForImageTextToText.from_pretrained(trained[0]).eval()
    with torch.no_grad():
        ref = model(**inputs).logits
        preps = [e[0] for e in examples]
        cache_features(model, preps)
        cached, _ = build_batch(PromptIds(processor), examples)
        for p in preps:
            p.features = None
    assert "pixel_values" not in cached and "mm_encoder_outputs" in cached
    with torch.no_grad():
        got = model(**cached).logits
    assert torch.allclose(ref, got, atol=1e-5)


def test_readout_targets_name_the_labels_of_the_panel_each_token_lies_in(batch):
    from datagen.letters import LETTERS

    processor, examples, inputs, info = batch
    prep = examples[0][0]
    t = readout_targets(prep)
    assert (prep.token_panel > 0).any()
    for token, p in enumerate(prep.token_panel.tolist()):
        if not p:
            assert (t[token] == -100).all()
            continue
        c, o, l, place = t[token].tolist()
        assert place == p - 1 and LETTERS[l] == prep.strip.letters[p - 1]
        assert prep.strip.captions[p - 1] == f"{OBJECTS[o]} with the {CHARACTERS[c]}"
    assert all(int((prep.token_panel == p).sum()) >= 1 for p in range(1, 7))  # every panel owns tokens


def test_letters_drawn_per_strip_keep_their_ink_boxes_and_the_local_readout_asks_only_those_tokens(trained):
    from dataclasses import replace

    from transformers import AutoProcessor

    from gaze.families import register_image_only_processors

    register_image_only_processors()
    cfg = replace(OrganismConfig(**SMALL), letters_per_strip=True, rescale_share=0.5, grid_share=0.5)
    pool, rng = PanelPool(cfg), random.Random(3)
    processor = AutoProcessor.from_pretrained(trained[0])
    for _ in range(6):
        s = pool.strip(rng)
        inks = s.meta["letter_boxes"]
        assert len(inks) == 6 and len(set(s.letters)) == 6
        for (x0, y0, x1, y1), (px0, py0, px1, py1) in zip(inks, s.panels):
            assert px0 - 1 <= x0 < x1 <= px1 + 1 and py0 - 1 <= y0 < y1 <= py1 + 1  # inside its panel
        prep = prepare(processor, s)
        whole, local = readout_targets(prep), readout_targets(prep, "local")
        assert torch.equal(whole[:, [0, 1, 3]], local[:, [0, 1, 3]])  # only the letter column changes
        cells = prep.layout(0).cells
        for t, p in enumerate(prep.token_panel.tolist()):
            if not p:
                continue
            x0, y0, x1, y1 = inks[p - 1]
            cx0, cy0, cx1, cy1 = cells[t].tolist()
            overlaps = cx0 < x1 and x0 < cx1 and cy0 < y1 and y0 < cy1
            assert int(local[t, 2]) == (int(whole[t, 2]) if overlaps else -100)
        asked = {int(prep.token_panel[t]) for t in range(len(local)) if local[t, 2] >= 0}
        assert asked <= set(range(1, 7)) and len(asked) >= 4  # most letters cover some token's cell
    # the same draw without per-strip letters has no ink boxes, and the local readout refuses it
    plain = prepare(processor, PanelPool(OrganismConfig(**SMALL, letters_per_strip=False)).strip(random.Random(3)))
    with pytest.raises(ValueError, match="letters-per-strip"):
        readout_loss_and_hits(torch.zeros(len(plain.token_panel), 44), readout_targets(plain, "pooled"), [plain], "pooled")
    with pytest.raises(ValueError, match="letters-per-strip"):
        readout_targets(plain, "local")


def test_focus_weights_tax_exactly_the_other_panels_at_the_rows_that_speak(batch):
    processor, examples, inputs, info = batch
    s = inputs["input_ids"].shape[1]
    w = focus_weights(info, s, 0.2)
    for i, (n, layout, membership, described) in enumerate(info):
        pos = layout.positions.tolist()
        for r in range(s):
            p = int(described[r + 1]) if r + 1 < len(described) else 0
            want = torch.zeros(s)
            if p:  # row r predicts a token describing panel p: every image key of the other panels
                for t, q in enumerate(pos):
                    if not membership[p - 1, t]:
                        want[q] = 0.2
            assert torch.equal(w[i, r], want)
        assert not w[i, : n - 1].any()  # no prompt row but the last


def test_row_targets_name_the_described_panels_labels_at_exactly_the_rows_that_speak(batch):
    processor, examples, inputs, info = batch
    s = inputs["input_ids"].shape[1]
    t = row_targets(examples, info, s)
    for i, ((prep, question, answer, panel), (n, _, _, described)) in enumerate(zip(examples, info)):
        labels = prep.strip.meta["labels"]
        for r in range(s):
            p = int(described[r + 1]) if r + 1 < len(described) else 0
            want = list(labels[p - 1]) if p else [-100] * 3
            assert t[i, r].tolist() == want
        assert (t[i, : n - 1] == -100).all()  # no prompt row but the last
        assert (t[i, n - 1] >= 0).all()  # the last prompt row predicts the answer's first token
    # the narration's rows name each panel in turn: all six panels' labels appear
    narr = next(i for i, e in enumerate(examples) if e[3] == 0)
    named = {tuple(x) for x in t[narr].tolist() if x[0] >= 0}
    assert named == {tuple(l) for l in examples[narr][0].strip.meta["labels"]}
    # the loss is the three cross-entropies over the rows that have targets
    torch.manual_seed(0)
    readout, hidden = torch.nn.Linear(8, 38), torch.randn(len(examples), s, 8)
    logits = readout(hidden)
    valid = t[..., 0] >= 0
    want = sum(torch.nn.functional.cross_entropy(part[valid], t[..., j][valid])
               for j, part in enumerate(logits.split((6, 8, 24), dim=-1)))
    assert torch.allclose(readout_loss(readout, hidden, t), want)


def test_augmentation_at_prompt_rows_covers_every_row_of_a_single_panel_answer(batch):
    from gaze.steering import key_bias

    processor, examples, inputs, info = batch
    s = inputs["input_ids"].shape[1]
    chosen = torch.ones(1, 3, 1, dtype=torch.bool)
    (b,) = augment_bias(info, chosen, s, prompt_rows=True)
    for i, (n, layout, membership, described) in enumerate(info):
        end = len(described) - 1
        p = int(described[n])
        if examples[i][3] == 0:  # the narration: answer rows only, as without prompt_rows
            assert not b[i, 0, : n - 1].any()
            continue
        want = key_bias(membership[p - 1], layout, n, s, 1e4, "boost")
        for r in range(end):
            assert torch.equal(b[i, 0, r], want)
        assert not b[i, 0, end:].any()


def test_the_training_hook_reads_eager_attention_and_its_penalty_is_the_hand_computed_mass(trained, batch):
    from transformers import AutoModelForImageTextToText

    from gaze.attention import active, prepare

    processor, examples, inputs, info = batch
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    eager = AutoModelForImageTextToText.from_pretrained(trained[0], attn_implementation="eager")
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True).attentions  # per layer [B, H, S, S]
    model = prepare(AutoModelForImageTextToText.from_pretrained(trained[0]))
    weights = penalty_weights(inputs, image_token, OrganismConfig(penalty=0.3))
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


@pytest.mark.parametrize("stage,settings", [
    (2, dict(focus=0.05)),  # stage 2: silent rows blinded, the focus term, augmentation by the head's scores
    (3, dict(focus=0.05, penalty=0.1, row_readout=0.3, gaze_augment=1.0, gaze_augment_heads=8,
             gaze_augment_weights="even")),  # stages 3-4: the penalty, the row readout, even augmentation
])
def test_a_training_step_on_the_eager_whole_matrix_path_equals_the_fused_kernels(trained, batch, stage, settings):
    """Where the training hook wants every row, each layer runs eagerly (scores and softmax once, shared by
    the output, the penalties and the even augmentation): the loss, the penalty and every gradient equal
    those of the fused SDPA output with the matrices recomputed beside it."""
    from transformers import AutoModelForImageTextToText

    from gaze.attention import prepare as prepare_attention
    from gaze.attention import whole_matrix_path
    from gaze.organism.train import step_loss

    processor, examples, *_ = batch
    model = prepare_attention(AutoModelForImageTextToText.from_pretrained(trained[0]))
    cfg = OrganismConfig(**{**SMALL, **settings})
    torch.manual_seed(0)
    readout = torch.nn.Linear(model.config.text_config.hidden_size, sum(READOUT[:3]))
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    got = {}
    for path in ("sdpa", "eager"):
        model.zero_grad(set_to_none=True)
        readout.zero_grad(set_to_none=True)
        with whole_matrix_path(path):
            ce, extra = step_loss(model, PromptIds(processor), examples, cfg, random.Random(5), stage, layers,
                                  heads, focus_on=True, readout=readout)
        (ce + extra).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        got[path] = (float(ce.detach()), float(extra.detach()), grads)
    (ce0, ex0, g0), (ce1, ex1, g1) = got["sdpa"], got["eager"]
    assert ex0 > 0 and ce1 == pytest.approx(ce0, rel=1e-5) and ex1 == pytest.approx(ex0, rel=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-3, atol=1e-6), name
    with pytest.raises(ValueError, match="eager"):
        with whole_matrix_path("flash"):
            pass


@pytest.mark.parametrize("bad", [{"mix": "panel:1,poem:1"}, {"min_width": 32}, {"grid_share": 1.5},
                                 {"vision_pos_embed": "sine"}, {"gaze_augment_heads": 0},
                                 {"letter_readout": "everywhere"}, {"letter_readout": "pooled", "letters_per_strip": False},
                                 {"letter_jitter": 1.5}, {"letter_batch": 0}, {"tower_from": "no/such/folder"},
                                 {"answer_loss": "sentence"}, {"gaze_augment_weights": "flat"},
                                 {"separator_panel": "both"}])
def test_bad_settings_are_refused_before_any_training(tmp_path, bad):
    with pytest.raises(ValueError):
        check_config(OrganismConfig(**{**SMALL, **bad}))
    with pytest.raises(ValueError):
        train(OrganismConfig(**{**SMALL, **bad}), tmp_path / "never")
    assert not (tmp_path / "never.building").exists()


def test_tokens_per_panel_counts_the_tokens_the_processor_gives_each_panel(trained):
    """The check's count (through generation's layout) equals the training's labels (through `prepare`)."""
    from transformers import AutoProcessor

    from gaze.models import load

    out, _ = trained
    loaded = load(str(out), device="cpu")
    processor = AutoProcessor.from_pretrained(out)
    strips = check.held_out("2x3", 3) + check.held_out("1x6@2x", 2)
    got = check.tokens_per_panel(loaded, strips)
    counts = [int((prepare(processor, s).token_panel == p).sum()) for s in strips for p in range(1, 7)]
    assert got == {"fewest": min(counts), "mean": round(sum(counts) / len(counts), 2),
                   "at_least_4": round(sum(c >= 4 for c in counts) / len(counts), 4), "panels": 30}
    # the recipe's narrowest panel (72 px) keeps two token columns after the processor's rounding
    assert got["fewest"] >= 4


def test_the_example_mean_loss_weighs_every_example_once_whatever_its_answers_length():
    from gaze.organism.train import example_mean_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 9, 11)
    labels = torch.full((3, 9), -100)
    labels[0, 3:8] = torch.tensor([1, 2, 3, 4, 5])  # a long answer
    labels[1, 8] = 6  # a one-token answer
    labels[2, 5:7] = torch.tensor([7, 8])
    per = []
    for b in range(3):  # the reference: each example's own mean over the tokens it predicts
        asked = labels[b, 1:] != -100
        per.append(torch.nn.functional.cross_entropy(logits[b, :-1][asked], labels[b, 1:][asked]))
    assert float(example_mean_loss(logits, labels)) == pytest.approx(float(sum(per) / 3), rel=1e-6)
    # the token mean (the model's own loss) weighs the long answer more: the two differ
    token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(token) - float(sum(per) / 3)) > 1e-3


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


# The shipped organism itself (gaze/organism/weights): its prompts, its gaze heads and its steering, measured
# on strips it never saw (seeds of the evaluation ranges, which the training pool does not draw from).

def _shipped():
    from gaze.models import ORGANISM_DIR

    return ORGANISM_DIR


SHIPPED = pytest.mark.skipif(not (_shipped() / "prompts.json").exists(), reason="no organism of this recipe is shipped")


@pytest.fixture(scope="module")
def organism():
    from gaze.models import load

    return load("organism", device="cpu")


@SHIPPED
def test_the_shipped_organism_records_its_prompts_and_loading_it_gives_them(organism):
    from gaze.prompts import Prompts

    recorded = json.loads((_shipped() / "prompts.json").read_text())
    assert recorded == PROMPTS  # the recipe's prompts are the paper's wordings
    assert organism.prompts == Prompts(**recorded)


@SHIPPED
def test_the_shipped_organism_has_gaze_heads_on_held_out_strips(organism, tmp_path):
    """Discovery (the paper's definition: last prompt row, raw mass) on strips it never saw: the top heads'
    6x6 matrix peaks on the queried panel in every row, and the top score is far from the median."""
    from gaze.discovery import discover

    strips = check.held_out("1x6", 8, seed0=2_500_000)
    ranking = discover(organism, strips, tmp_path / "d", template=organism.prompts.discovery, progress=False,
                       source="test")
    m = check.mechanism(ranking, 3)
    assert m["diagonal_everywhere"], m["rows"]
    assert m["top_score"] >= 0.3
    assert float(ranking.scores.flatten().median()) < 0.1 * m["top_score"]


@SHIPPED
def test_the_shipped_organisms_top_heads_look_at_the_panel_being_narrated(organism):
    """The staircase: while it narrates panel by panel, the top heads' attention peaks on the panel being
    described, and random low-score heads barely look at the image."""
    from gaze.ranking import Ranking

    ranking = Ranking.load(_shipped() / "ranking.json")
    strips = check.held_out("1x6", 3, seed0=2_700_000)
    top = check.staircase(organism, strips, ranking.top(3), organism.prompts.narration)
    low = check.staircase(organism, strips, ranking.order()[-3:], organism.prompts.narration)
    assert top["tokens"] >= 60 and top["share"] >= 0.7, top
    assert top["image_mass"] >= 0.1 and low["image_mass"] <= 0.01, (top, low)
    miss = top["misses"]  # every miss counted once; where the heads miss, they have moved on to the next panel
    assert miss["count"] == round((1 - top["share"]) * top["tokens"]) >= sum(miss["by_token"].values()) > 0
    assert miss["on_next_panel"] >= 0.9 * miss["count"], miss


@SHIPPED
def test_the_shipped_top_heads_look_at_the_asked_panels_letter(organism):
    """Asked the letter of panel k (or read in reverse, of panel 7 - k), the top heads' last-row attention
    peaks on that panel and much of it lies on the letter's ink; low-score heads do not look at the image."""
    from gaze.ranking import Ranking

    ranking = Ranking.load(_shipped() / "ranking.json")
    strips = check.held_out("1x6", 2, seed0=2_800_000)
    top = check.letter_attention(organism, strips, ranking.top(3))
    low = check.letter_attention(organism, strips, ranking.order()[-2:])
    for task in ("letter", "reverse_letter"):
        assert top[task].pop("questions") == 12 and low[task].pop("questions") == 12
        for head, v in top[task].items():
            assert v["argmax"] >= 0.9 and v["panel"] >= 0.5 and 0.3 <= v["ink"] <= 1.0, (task, head, v)
        assert all(v["panel"] <= 0.01 and v["ink"] <= 0.01 for v in low[task].values()), low[task]


@SHIPPED
def test_steering_the_shipped_top_heads_moves_the_whole_strip_answer_to_each_panel(organism):
    from gaze.ranking import Ranking

    ranking = Ranking.load(_shipped() / "ranking.json")
    strips = check.held_out("1x6", 4, seed0=2_600_000)
    k = math.ceil(0.15 * ranking.scores.numel()) - 1  # under 15% of the heads
    top = check.redirection(organism, strips, ranking.top(k), PROMPTS["vqa"])
    low = check.redirection(organism, strips, ranking.order()[-k:], PROMPTS["vqa"])
    assert top["hit"][0] >= 0.8, top
    assert low["hit_and_moved"][0] <= 0.2, low  # the lowest-score heads leave the answer where it was


def test_a_later_tower_stage_goes_on_from_a_tower_and_its_readout_on_strips_drawn_anew(trained, tmp_path):
    from safetensors.torch import load_file

    from gaze.organism.train import TOWER_READOUT

    out, first = trained
    assert (out / TOWER_READOUT).is_file() and "letter_sheet_accuracy" in first  # stage 0 ran, stage 1 kept its readout
    cfg = OrganismConfig(**{**SMALL, "tower_from": str(out), "letter_steps": 0, "vision_fresh": True, "steps": 0,
                            "unmask_steps": 0})
    record = train(cfg, tmp_path / "later", log=lambda s: None)
    assert record["tower"]["config"] == first["config"]  # the tower it went on from, recorded beside this stage
    assert "letter_sheet_accuracy" not in record and "vision_held_out_accuracy" in record
    before, after = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "later" / "model.safetensors"))
    tower = [k for k in before if ".visual." in k]
    assert tower and any(not torch.equal(before[k], after[k]) for k in tower)  # trained on, not copied
    assert (tmp_path / "later" / TOWER_READOUT).is_file()
    with pytest.raises(ValueError, match="exclude"):
        check_config(OrganismConfig(**{**SMALL, "tower_from": str(out), "vision_from": str(out)}))


@SHIPPED
@pytest.mark.parametrize("task", ["letter", "reverse_letter"])
def test_the_shipped_organism_names_the_letters_of_held_out_panels(organism, task):
    """The letter question on strips it never saw, every panel of each, and the same read in reverse (the k-th
    panel's letter from the right): far above chance (1 in 24)."""
    from gaze.generation import generate
    from gaze.organism.train import ask

    asked = [(s, k) for s in check.held_out("1x6", 6, seed0=2_800_000) for k in range(1, 7)]
    said = [generate(organism, s.image, ask(task, k), max_new_tokens=4).text.strip() for s, k in asked]
    panel = (lambda k: k) if task == "letter" else (lambda k: 7 - k)
    right = sum(a == s.letters[panel(k) - 1] for a, (s, k) in zip(said, asked))
    assert right / len(asked) >= 0.5, said


def test_letter_outcome_tells_the_mirrored_reading_order_from_a_misread():
    """A letter answer is right for the asked panel (k forwards, 7 - k in reverse), "mirrored" when it names the
    other reading order's panel, "other_panel" for another letter on the strip and "unknown" otherwise."""
    letters = ("A", "B", "C", "D", "E", "F")
    assert check.letter_outcome("A", letters, 1, reverse=False) == "right"
    assert check.letter_outcome("F.", letters, 1, reverse=False) == "mirrored"
    assert check.letter_outcome(" f", letters, 1, reverse=True) == "right"
    assert check.letter_outcome("A", letters, 1, reverse=True) == "mirrored"
    assert check.letter_outcome("D", letters, 3, reverse=False) == "mirrored"
    assert check.letter_outcome("B", letters, 3, reverse=False) == "other_panel"
    assert check.letter_outcome("Z", letters, 3, reverse=True) == "unknown"
