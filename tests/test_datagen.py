"""datagen in memory: stories, procedural panels, letters, assembly, make_strip, scenes, bad input."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from datagen import ACTIONS, CHARACTERS, OBJECTS, SCENES, DatagenError, make_scene, make_strip, template_story
from datagen.letters import LETTERS, PALETTE, draw_letter
from datagen.procedural import CHARACTER_DRAWINGS, OBJECT_DRAWINGS, SCENE_DRAWINGS, draw_panel
from datagen.story import (ACTION_PHRASES, CHARACTER_LOOKS, OBJECT_PHRASES, SCENE_PHRASES, Story,
                           parse_story_lines, story_from_lm_text)


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def inside(box, outer) -> bool:
    return outer[0] <= box[0] < box[2] <= outer[2] and outer[1] <= box[1] < box[3] <= outer[3]


def test_every_vocabulary_word_has_a_drawing_and_a_phrase():
    assert set(CHARACTER_DRAWINGS) == set(CHARACTERS) == set(CHARACTER_LOOKS)
    assert set(OBJECT_DRAWINGS) == set(OBJECTS) == set(OBJECT_PHRASES)
    assert set(SCENE_DRAWINGS) == set(SCENES) == set(SCENE_PHRASES)
    assert set(ACTIONS) == set(ACTION_PHRASES)


def test_template_story_one_character_six_distinct_panels():
    characters = set()
    for seed in range(60):
        story = template_story(seed)
        assert story == template_story(seed)
        characters.add(story.character)
        assert len(story.panels) == 6 and story.drawable
        assert len(set(story.captions)) == 6
        for words in ("action", "object", "scene"):
            assert len({getattr(p, words) for p in story.panels}) == 6
        for p in story.panels:
            article = "an" if p.object == "umbrella" else "a"
            assert p.caption == f"the {story.character} {p.action} by {article} {p.object}"
            # The shared prefix is what keeps a diffusion model's character consistent.
            assert p.prompt.startswith(f"{story.style}, {CHARACTER_LOOKS[story.character]}, ")
    assert characters == set(CHARACTERS)


def test_story_dict_round_trip():
    for story in (template_story(3), story_from_lm_text(template_story(4), _LM_TEXT, "some/lm")):
        assert Story.from_dict(story.to_dict(), story.captions, story.prompts) == story


_LM_TEXT = """1. The cat wakes up in a sunny kitchen.
2) The cat chases a red ball across the lawn
Panel 3: "The cat climbs an old oak tree."
4 - The cat naps on a warm roof
5. The cat meets a dog at the gate.
6. The cat eats dinner by the fireplace.
7. An extra line the parser ignores."""


def test_lm_parser_reads_numbered_lines_and_falls_back():
    captions = parse_story_lines(_LM_TEXT)
    assert captions == ("The cat wakes up in a sunny kitchen", "The cat chases a red ball across the lawn",
                        "The cat climbs an old oak tree", "The cat naps on a warm roof",
                        "The cat meets a dog at the gate", "The cat eats dinner by the fireplace")
    assert parse_story_lines("1. a\n2. b\n3. c\n4. d\n5. e") is None  # a panel missing
    assert parse_story_lines("1. a\n2. b\n3. c\n4. d\n5. e\n6. A") is None  # two panels alike
    base = template_story(1)
    lm = story_from_lm_text(base, _LM_TEXT, "org/lm")
    assert lm.writer == "lm:org/lm" and lm.captions == captions and not lm.drawable
    assert all(p.startswith(f"{base.style}, {base.protagonist}, ") for p in lm.prompts)
    fallback = story_from_lm_text(base, "gibberish", "org/lm")
    assert fallback.captions == base.captions and fallback.writer == "template (lm:org/lm unparseable)"


def test_make_strip_is_bit_identical_for_a_seed():
    a, b, c = make_strip(5), make_strip(5), make_strip(6)
    assert a.image.tobytes() == b.image.tobytes() and a == b and a.meta == b.meta
    assert a.image.tobytes() != c.image.tobytes()


def test_make_strip_contents():
    strip = make_strip(11, panel_size=64, align=32)
    story = template_story(11)
    assert strip.image.size == (384, 64)
    assert strip.panels == tuple((64 * k, 0, 64 * k + 64, 64) for k in range(6))
    assert strip.captions == story.captions
    assert len(set(strip.letters)) == 6 and all(x in LETTERS for x in strip.letters)
    meta = strip.meta
    assert meta["seed"] == 11 and meta["renderer"] == "procedural" and meta["model_id"] is None
    assert meta["story"] == story.to_dict() and meta["prompts"] == list(story.prompts)
    assert meta["reading_order"] == [[0, k] for k in range(6)]
    for k, panel in enumerate(strip.panels):
        assert inside(meta["letter_boxes"][k], panel)
        labels = [o["label"] for o in meta["object_boxes"][k]]
        assert labels == [story.character, story.panels[k].object]
        assert all(inside(o["box"], panel) for o in meta["object_boxes"][k])


def test_letters_change_only_the_pixels_under_their_boxes():
    # Letters use their own random stream: the same strip without letters differs only inside the letter boxes.
    with_letters, without = make_strip(8), make_strip(8, letters=False)
    assert without.letters is None and without.meta["letter_boxes"] is None
    assert with_letters.captions == without.captions
    diff = np.any(pixels(with_letters.image) != pixels(without.image), axis=2)
    mask = np.zeros_like(diff)
    for x0, y0, x1, y1 in with_letters.meta["letter_boxes"]:
        mask[y0:y1, x0:x1] = True
        assert diff[y0:y1, x0:x1].sum() > 0.1 * (x1 - x0) * (y1 - y0)  # the letter is really drawn
    assert not (diff & ~mask).any()


def test_object_box_covers_its_drawing():
    # The star is the only pure (255, 200, 0) thing in a panel; its pixels must lie inside its box.
    for seed in range(10):
        panel = draw_panel("cat", "sits", "star", "park", 128, random.Random(seed))
        gold = np.all(pixels(panel.image) == (255, 200, 0), axis=2)
        ys, xs = np.nonzero(gold)
        x0, y0, x1, y1 = panel.objects[1]["box"]
        assert panel.objects[1]["label"] == "star" and len(xs) > 50
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert (xs.max() - xs.min()) > 0.5 * (x1 - x0)  # and the box is not much bigger (tips and outline are blended)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (255, 215, 0), (25, 60, 230), (128, 128, 128)])
def test_letter_contrasts_with_its_background(background):
    for seed in range(5):
        image = Image.new("RGB", (64, 64), background)
        x0, y0, x1, y1 = draw_letter(image, "W", random.Random(seed))
        inner = pixels(image)[y0:y1, x0:x1].reshape(-1, 3).astype(int)
        colours, counts = np.unique(inner, axis=0, return_counts=True)
        fill = next(c for c in colours[np.argsort(-counts)] if tuple(c) in PALETTE and tuple(c) != background)
        assert np.linalg.norm(fill - np.array(background)) >= 160


@pytest.mark.parametrize("size", [16, 32, 48, 64, 128, 512])
def test_any_panel_size_renders(size):
    strip = make_strip(2, panel_size=size)
    assert strip.image.size == (6 * size, size)
    heights = [(y1 - y0) / size for _, y0, _, y1 in strip.meta["letter_boxes"]]
    # Letters scale with the panel (a quarter to a half of it), down to a 10-px floor on the smallest panels.
    assert all(0.2 <= h <= 0.5 for h in heights) or size == 16 and all(h <= 0.7 for h in heights)


@pytest.mark.parametrize("layout,grid", [("2x3", (2, 3)), ("3x2", (3, 2))])
def test_grid_layouts_record_reading_order(layout, grid):
    rows, cols = grid
    strip = make_strip(4, panel_size=64, gap=32, layout=layout, align=32)
    assert strip.image.size == (cols * 64 + (cols - 1) * 32, rows * 64 + (rows - 1) * 32)
    assert strip.meta["reading_order"] == [[k // cols, k % cols] for k in range(6)]
    for k, (x0, y0, x1, y1) in enumerate(strip.panels):
        assert (x0, y0) == ((k % cols) * 96, (k // cols) * 96)
        # panel borders fall on the 32-px token grid
        assert all(v % 32 == 0 for v in (x0, y0, x1, y1))
        assert inside(strip.meta["letter_boxes"][k], (x0, y0, x1, y1))
        assert all(inside(o["box"], (x0, y0, x1, y1)) for o in strip.meta["object_boxes"][k])


@pytest.mark.parametrize("kwargs,message", [
    ({"renderer": "sketchy"}, "procedural, diffusers"),
    ({"renderer": "diffusers"}, "load_pipeline"),
    ({"panel_size": 8}, "at least 16"),
    ({"panel_size": 50, "align": 32}, "multiple of 32"),
    ({"gap": 10, "align": 32}, "multiple of 32"),
    ({"gap": -1}, "gap"),
    ({"layout": "4x4"}, "1x6, 2x3, 3x2"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(DatagenError, match=message):
        make_strip(0, **kwargs)


def test_make_scene_places_distinct_labelled_objects():
    image, objects = make_scene(3, size=(448, 320), n_objects=5)
    again, same = make_scene(3, size=(448, 320), n_objects=5)
    assert image.size == (448, 320) and image.tobytes() == again.tobytes() and objects == same
    labels = [o["label"] for o in objects]
    assert len(set(labels)) == 5 and set(labels) <= set(CHARACTERS + OBJECTS)
    boxes = [o["box"] for o in objects]
    assert all(inside(b, (0, 0, 448, 320)) for b in boxes)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert len({(b[2] - b[0]) for b in boxes}) > 1  # different sizes
    with pytest.raises(DatagenError, match="fewer objects"):
        make_scene(0, size=(40, 40), n_objects=14)
