"""The paper preset: preset resolution, the official code's proportional panel mapping, the official strip
assembly, and the baseline-identical rule (docs/paper-protocol.md)."""

import dataclasses

import pytest
import torch

from gaze.eval.config import PRESETS, EvalConfig, EvalError, preset_for, resolve_preset
from gaze.eval.protocols import (aggregate, answer_similarity, answer_words, eval_strips, identical_rule, jaccard)
from gaze.generation import regions_for
from gaze.regions import RegionError, grid_layout, panel_regions, proportional_columns


# ---------------------------------------------------------------- presets

def test_auto_preset_is_the_organism_for_the_organism_and_prompt_folders_else_the_paper(tmp_path):
    assert preset_for("organism") == "organism" and preset_for("Qwen/Qwen3-VL-8B-Instruct") == "paper"
    assert preset_for(str(tmp_path)) == "paper"
    (tmp_path / "prompts.json").write_text("{}")
    assert preset_for(str(tmp_path)) == "organism"


def test_the_paper_preset_gives_the_official_values_and_explicit_flags_win():
    cfg = resolve_preset(EvalConfig(model="Qwen/Qwen3-VL-8B-Instruct"))
    got = {k: getattr(cfg, k) for k in PRESETS["paper"]}
    assert got == {"max_new_tokens": 15, "narration_tokens": 100, "every": 50, "phase": "all",
                   "dynamic_phase": "decode", "panel_size": 256, "assembly": "official", "mapping": "proportional",
                   "identical_threshold": 0.85, "identical_tokens": "word"}
    assert cfg.preset == "paper" and cfg.question("dynamic").startswith("Please describe each panel of this comic")
    assert cfg.question("vqa") == "What is the main action or event happening in this comic strip? Answer briefly."
    mine = resolve_preset(EvalConfig(model="Qwen/Qwen3-VL-8B-Instruct", every=7, mapping="centre",
                                     questions=(("dynamic", "Narrate."),), identical_threshold=1.01))
    assert (mine.every, mine.mapping, mine.question("dynamic"), mine.identical_threshold) == (7, "centre", "Narrate.",
                                                                                             1.01)
    assert mine.max_new_tokens == 15  # what was not given still comes from the preset


def test_the_organism_preset_keeps_todays_defaults():
    cfg = resolve_preset(EvalConfig())
    assert cfg.preset == "organism"
    assert (cfg.max_new_tokens, cfg.narration_tokens, cfg.every, cfg.phase, cfg.dynamic_phase, cfg.panel_size,
            cfg.assembly, cfg.mapping) == (24, 64, 10, "all", "all", 64, "paper", "centre")
    assert resolve_preset(EvalConfig(phase="prefill")).dynamic_phase == "all"  # schedules steer the answer too
    assert resolve_preset(EvalConfig(phase="decode")).dynamic_phase == "decode"
    assert resolve_preset(EvalConfig(preset="paper")).mapping == "proportional"  # named, not auto


@pytest.mark.parametrize("bad, match", [(dict(preset="nope"), "--preset"), (dict(mapping="corner"), "--mapping"),
                                        (dict(identical_tokens="char"), "--identical-tokens"),
                                        (dict(identical_threshold=-0.1), "--identical-threshold")])
def test_bad_preset_settings_are_refused(bad, match):
    with pytest.raises(EvalError, match=match):
        resolve_preset(EvalConfig(**bad))


# ---------------------------------------------------------------- token -> panel mapping

def test_proportional_columns_round_as_python_does_and_keep_a_column_per_panel():
    assert proportional_columns(12, [64] * 6) == [0, 2, 4, 6, 8, 10, 12]
    assert proportional_columns(6, [5, 7]) == [0, 2, 6]  # 2.5 rounds to even
    assert proportional_columns(6, [7, 5]) == [0, 4, 6]  # 3.5 rounds to even
    assert proportional_columns(3, [1, 100, 1]) == [0, 1, 2, 3]  # 0.03 -> 1 and 2.97 -> 2: one column each
    assert proportional_columns(10, [30, 70]) == [0, 3, 10]


def _assign(layout, panels, mapping):
    return panel_regions(layout, panels, mapping).assignment().tolist()


@pytest.mark.parametrize("widths, rows", [([64] * 6, 2), ([32, 96, 64, 32, 128, 64], 3), ([96] * 6, 1)])
def test_both_mappings_agree_exactly_on_aligned_strips(widths, rows):
    xs = [sum(widths[:k]) for k in range(len(widths) + 1)]
    w, h = xs[-1], 32 * rows
    layout = grid_layout(5, (rows, w // 32), (w, h), (w, h))
    panels = [(xs[k], 0, xs[k + 1], h) for k in range(len(widths))]
    centre = panel_regions(layout, panels, "centre").membership
    proportional = panel_regions(layout, panels, "proportional").membership
    assert torch.equal(centre, proportional)
    assert centre.sum(0).eq(1).all()  # every token in exactly one panel
    assert torch.equal(regions_for(layout, panels, mapping="proportional").membership, proportional)


def test_the_mappings_differ_as_computed_by_hand_on_an_unaligned_strip():
    # 100 x 25 px image, 4 token columns of 25 px (centres 12.5, 37.5, 62.5, 87.5), one row.
    layout = grid_layout(0, (1, 4), (100, 25), (100, 25))
    # a 20 px margin, then panels of 30 and 50 px: centre leaves column 0 to no panel; proportional splits the
    # 4 columns 30:50, boundary round(4 * 30 / 80) = round(1.5) = 2, and gives column 0 to panel 1
    panels = [(20, 0, 50, 25), (50, 0, 100, 25)]
    assert _assign(layout, panels, "centre") == [-1, 0, 1, 1]
    assert _assign(layout, panels, "proportional") == [0, 0, 1, 1]
    # panels of 30 px with a 40 px gap: centre gives the two gap columns to no panel, proportional (30:30 ->
    # boundary 2) gives each panel two columns
    panels = [(0, 0, 30, 25), (70, 0, 100, 25)]
    assert _assign(layout, panels, "centre") == [0, -1, -1, 1]
    assert _assign(layout, panels, "proportional") == [0, 0, 1, 1]


def test_proportional_mapping_refuses_two_rows_of_panels():
    layout = grid_layout(0, (2, 6), (192, 64), (192, 64))
    grid2x3 = [(c * 64, r * 32, (c + 1) * 64, (r + 1) * 32) for r in range(2) for c in range(3)]
    assert _assign(layout, grid2x3, "centre") == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    with pytest.raises(RegionError, match="ONE row of panels.*mapping 'centre'"):
        panel_regions(layout, grid2x3, "proportional")
    with pytest.raises(RegionError, match="unknown panel mapping"):
        panel_regions(layout, grid2x3, "nearest")


# ---------------------------------------------------------------- official strip assembly

def test_official_assembly_rounds_to_32_px_and_paints_the_gaps_over_the_seams():
    s = eval_strips("procedural:eval", 1, panel_size=250, assembly="official")[0]  # 250 rounds to 256
    w, h = s.image.size
    assert h == 256 and w % 32 == 0
    widths = [b[2] - b[0] for b in s.panels]
    assert all(x % 32 == 0 and 256 <= x <= 448 for x in widths) and sum(widths) == w
    assert all(s.panels[k][2] == s.panels[k + 1][0] for k in range(5))  # abutting boxes: no inserted gap
    px = s.image.convert("RGB").load()
    seam = int(s.panels[0][2])
    assert all(px[x, y] == (255, 255, 255) for x in range(seam - 3, seam + 3) for y in range(0, 256, 17))
    assert [b[2] - b[0] for b in eval_strips("procedural:eval", 1, panel_size=250, assembly="official")[0].panels] \
        == widths  # seeded


# ---------------------------------------------------------------- baseline-identical answers

def test_word_jaccard_by_hand():
    assert answer_words("Panel 2: The cat, digs!") == ["the", "cat", "digs"]
    # {the, cat, digs} vs {the, cat, sleeps}: 2 shared of 4
    assert answer_similarity("The cat digs.", "the cat sleeps", "word") == 0.5
    assert answer_similarity("Panel 1: cat digs", "cat digs", "word") == 1.0
    assert answer_similarity("a b c d e f g h i j", "a b c d e f g h i k", "word") == pytest.approx(9 / 11)
    assert jaccard([], ["a"]) is None and answer_similarity("...", "cat", "word") is None  # empty: never identical
    assert jaccard([1, 2, 2, 3], [2, 3, 4]) == 0.5  # sets, not counts


def test_token_jaccard_uses_the_given_tokenizer():
    ids = {"cat digs": [7, 8, 9], "cat sleeps": [7, 10]}
    assert answer_similarity(" cat digs ", "cat sleeps", "token", ids.__getitem__) == 0.25  # {7} of {7, 8, 9, 10}
    with pytest.raises(EvalError, match="tokenizer"):
        answer_similarity("a", "b", "token")


def _records(threshold):
    """Two strips x 2 targets, steered: every judge verdict a hit; strip a's target-1 answer repeats the
    unsteered one (similarity 1.0), strip b's target-2 answer nearly does (0.9); plus the unsteered records."""
    recs = []
    for sid, target, answer, baseline in [("a", 1, "cat digs", "cat digs"), ("a", 2, "dog runs", "cat digs"),
                                          ("b", 1, "fish swims", "a b c d e f g h i"),
                                          ("b", 2, "a b c d e f g h i j", "a b c d e f g h i")]:
        rec = {"key": f"vqa|gaze|{sid}|{target}|2", "protocol": "vqa", "condition": "gaze", "k": 2, "strip_id": sid,
               "target": target, "answer": answer, "degenerate": False, "matched": target, "correct": True,
               "why": "judge"}
        recs.append(identical_rule(rec, baseline, answer_similarity(answer, baseline), threshold))
        none = {**rec, "key": f"vqa|none|{sid}|{target}|0", "condition": "none", "k": 0, "answer": baseline,
                "matched": 1, "correct": target == 1}
        recs.append(identical_rule(none, None, None, threshold))
    return recs


def test_aggregate_with_and_without_the_baseline_identical_rule():
    with_rule = aggregate(_records(0.85), n_boot=50)["protocols"]["vqa"]
    assert with_rule["gaze"]["accuracy"] == 0.5 and with_rule["gaze"]["identical"] == 0.5
    assert with_rule["gaze"]["judged_accuracy"] == 1.0
    assert {q: v["accuracy"] for q, v in with_rule["gaze"]["per_panel"].items()} == {"1": 0.5, "2": 0.5}
    assert with_rule["none"]["accuracy"] == 0.5 and with_rule["none"]["identical"] is None
    strict = aggregate(_records(0.95), n_boot=50)["protocols"]["vqa"]["gaze"]  # 0.9 is no longer identical
    assert strict["accuracy"] == 0.75 and strict["identical"] == 0.25
    off = aggregate(_records(1.01), n_boot=50)["protocols"]["vqa"]["gaze"]
    assert off["accuracy"] == 1.0 and off["identical"] == 0.0
    rec = _records(0.85)[0]
    assert rec["identical"] and not rec["correct"] and rec["judged_correct"] and rec["similarity"] == 1.0
    assert rec["baseline_answer"] == "cat digs" and "identical to the unsteered answer" in rec["why"]


# ---------------------------------------------------------------- end to end on a tiny random model

def test_paper_preset_end_to_end_records_its_settings_and_refuses_others(loaded_qwen3, qwen3_path, tmp_path):
    import json

    from gaze.eval.config import MANIFEST, RECORDS
    from gaze.eval.protocols import mapped_panels, run_eval
    from gaze.generation import prepare_inputs

    cfg = EvalConfig(model=str(qwen3_path), strips="procedural:eval", n_strips=1, out=str(tmp_path / "eval"),
                     protocols=("vqa",), conditions=("gaze", "none"), top_k=2, targets=(2,), n_discovery=1,
                     max_new_tokens=2, narration_tokens=2, n_boot=50)  # a folder without prompts.json: "paper"
    agg = run_eval(cfg, loaded=loaded_qwen3, progress=False)
    manifest = json.loads((tmp_path / "eval" / MANIFEST).read_text())
    assert {k: manifest[k] for k in ("preset", "mapping", "assembly", "panel_size", "every", "dynamic_phase",
                                     "identical_threshold", "identical_tokens", "narration_tokens")} == {
        "preset": "paper", "mapping": "proportional", "assembly": "official", "panel_size": 256, "every": 50,
        "dynamic_phase": "decode", "identical_threshold": 0.85, "identical_tokens": "word", "narration_tokens": 2}
    assert manifest["max_new_tokens"] == 2 and manifest["questions"]["dynamic"].startswith("Please describe each")
    recs = {r["condition"]: r for r in map(json.loads, (tmp_path / "eval" / RECORDS).read_text().splitlines())}
    assert recs["none"]["identical"] is None
    steered = recs["gaze"]
    assert steered["baseline_answer"] == recs["none"]["answer"] and "judged_correct" in steered
    assert steered["similarity"] == (None if not steered["answer"].strip() else pytest.approx(
        answer_similarity(steered["answer"], recs["none"]["answer"]), abs=1e-4))
    assert agg["meta"]["preset"] == "paper" and "identical" in agg["protocols"]["vqa"]["gaze"]
    # the proportional boxes give every image token of the strip to one panel
    strip = eval_strips("procedural:eval", 1, panel_size=256, assembly="official")[0]
    _, layout = prepare_inputs(loaded_qwen3, strip.image, "")
    member = panel_regions(layout, mapped_panels(loaded_qwen3, strip)).membership
    assert member.sum(0).eq(1).all()
    with pytest.raises(EvalError, match="other settings.*mapping"):
        run_eval(dataclasses.replace(cfg, mapping="centre"), loaded=loaded_qwen3, progress=False)


def test_proportional_mapping_refuses_two_row_strips_before_generating():
    from gaze.eval.protocols import _check_strips

    strips = eval_strips("procedural:eval", 1)
    two_rows = dataclasses.replace(strips[0], panels=tuple((c * 64, r * 32, (c + 1) * 64, (r + 1) * 32)
                                                           for r in range(2) for c in range(3)))
    cfg = resolve_preset(EvalConfig(preset="paper", protocols=("vqa",)))
    _check_strips(cfg, strips)  # one row: fine
    with pytest.raises(EvalError, match="several rows.*--mapping centre"):
        _check_strips(cfg, [two_rows])
    _check_strips(dataclasses.replace(cfg, mapping="centre"), [two_rows])


def test_comic_folders_are_stitched_the_official_way_under_the_official_assembly(tmp_path):
    from PIL import Image

    from gaze.strips import load_strips, stitch_official

    sizes = [(100, 100), (150, 100), (300, 200), (90, 120), (100, 100), (500, 250)]
    comic = tmp_path / "comics" / "comic1"
    comic.mkdir(parents=True)
    for k, (w, h) in enumerate(sizes, start=1):
        Image.new("RGB", (w, h), (10 * k, 0, 0)).save(comic / f"p{k}.png")
    # at height 256: widths int(w * 256 / h) = 256, 384, 384, 192, 256, 512, each rounded to a multiple of 32
    image, boxes = stitch_official([Image.open(comic / f"p{k}.png") for k in range(1, 7)])
    assert [b[2] - b[0] for b in boxes] == [256, 384, 384, 192, 256, 512] and image.size == (1984, 256)
    assert [b[0] for b in boxes] == [0, 256, 640, 1024, 1216, 1472]  # abutting
    px = image.load()
    assert px[253, 100] == px[258, 100] == (255, 255, 255) and px[252, 100] == (10, 0, 0) and px[259, 100] == (20, 0, 0)
    # a 70 x 100 panel: int(179.2) = 179 px, 5.6 multiples of 32 -> 192; 60 x 100: 153 px, 4.8 -> 160
    assert [b[2] - b[0] for b in stitch_official([Image.new("RGB", (70, 100)), Image.new("RGB", (60, 100))])[1]] \
        == [192, 160]
    strips = eval_strips(str(tmp_path / "comics"), 1, align=32, panel_size=256, assembly="official")
    assert strips[0].panels == boxes and strips[0].image.tobytes() == image.tobytes()
    grid = eval_strips(str(tmp_path / "comics"), 1, align=32)[0]  # other assemblies: one cell size, as before
    assert len({b[2] - b[0] for b in grid.panels}) == 1
