"""The strength and paraphrase sweeps: parsing, overlap arithmetic, and a tiny run checked against direct calls."""

import argparse
import json

import pytest

from gaze.eval.config import RECORDS, EvalConfig, EvalError
from gaze.eval.sweeps import (PAPER_STRENGTHS, PAPER_VQA_PARAPHRASES, PARAPHRASE_DISCOVERY, question_id,
                              read_paraphrases, top_set_overlap, vqa_paraphrases)


def test_paraphrase_files_split_into_vqa_and_discovery_wordings(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# wordings\nWhat happens here?\n\nWhat is in the {ordinal} panel?\nPanel {k}: what is it?\n")
    assert read_paraphrases(f) == (["What happens here?"], ["What is in the {ordinal} panel?", "Panel {k}: what is it?"])
    cfg = EvalConfig(paraphrases=str(f))
    assert vqa_paraphrases(cfg) == [cfg.question("vqa"), "What happens here?"]
    assert vqa_paraphrases(EvalConfig()) == [EvalConfig().question("vqa"), *PAPER_VQA_PARAPHRASES]
    f.write_text("What is in panel {n}?\n")  # a discovery-looking line with an unknown placeholder
    f.write_text("What is in the {ordinal} panel {n}?\n")
    with pytest.raises(EvalError, match="placeholders other than"):
        read_paraphrases(f)
    f.write_text("# nothing\n\n")
    with pytest.raises(EvalError, match="holds no question"):
        read_paraphrases(f)
    with pytest.raises(EvalError, match="not found"):
        read_paraphrases(tmp_path / "missing.txt")


def test_top_set_overlap_on_known_sets():
    r = top_set_overlap([[(0, 1), (1, 2), (2, 3)], [(1, 2), (2, 3), (3, 0)], [(5, 5), (1, 2), (0, 0)]])
    assert r["overlap"] == [[3, 2, 1], [2, 3, 1], [1, 1, 3]]
    assert r["jaccard"][0][1] == pytest.approx(2 / 4) and r["jaccard"][0][2] == pytest.approx(1 / 5)
    assert r["jaccard"][1][1] == 1.0 and r["common"] == [(1, 2)]
    assert question_id("a") == question_id("a") != question_id("b")


def test_the_cli_reads_strengths_and_paraphrases(tmp_path):
    from gaze.eval.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--protocols", "strength,paraphrase", "--strengths", "1,10,1e4",
                                         "--paraphrases", str(tmp_path / "p.txt")]))
    assert cfg.strengths == (1.0, 10.0, 1e4) and cfg.paraphrases == str(tmp_path / "p.txt")
    assert config_from_args(p.parse_args([])).strengths == PAPER_STRENGTHS
    assert "strength" not in EvalConfig().protocols  # asked for, not run by default
    for bad in ("0,1", "1,x", "-3"):
        with pytest.raises(SystemExit):
            p.parse_args(["--strengths", bad])


def test_strength_and_paraphrase_sweeps_on_a_tiny_model(loaded_qwen3, qwen3_path, tmp_path):
    from gaze.discovery import discover
    from gaze.eval.protocols import eval_strips, run_eval
    from gaze.eval.report import write_report
    from gaze.generation import generate
    from gaze.ranking import Ranking
    from gaze.steering import Panel

    ranking_dir = tmp_path / "ranking"
    discover(loaded_qwen3, eval_strips("procedural:discovery", 1), ranking_dir, progress=False)
    words = tmp_path / "p.txt"
    words.write_text("What is shown?\nWhat is in the {ordinal} panel?\n")
    cfg = EvalConfig(model=str(qwen3_path), preset="organism", ranking=str(ranking_dir), strips="procedural:eval",
                     n_strips=1,
                     out=str(tmp_path / "e"), protocols=("vqa", "strength", "paraphrase"),
                     conditions=("gaze", "random", "none"), top_k=2, targets=(2, 5), max_new_tokens=3,
                     strengths=(1.0, 1e4), paraphrases=str(words), discovery_strips="procedural:discovery",
                     n_discovery=1, n_boot=100, control_draws=1)
    agg = run_eval(cfg, loaded=loaded_qwen3, progress=False)
    records = [json.loads(l) for l in (tmp_path / "e" / RECORDS).read_text().splitlines()]
    by = {(r["protocol"], r["condition"], r["target"]): r for r in records}
    vqa_q, strip_id = cfg.question("vqa"), records[0]["strip_id"]
    questions = [vqa_q, "What is shown?"]
    assert {k for k in by if k[0] == "strength"} == {("strength", c, f"{t}@d={b:g}") for c in ("gaze", "random:0")
                                                     for t in (2, 5) for b in (1.0, 1e4)}
    assert {k for k in by if k[0] == "paraphrase"} == {("paraphrase", c, f"{t}@q{question_id(q)}")
                                                       for c in ("gaze", "random:0", "none") for t in (2, 5)
                                                       for q in questions}
    strip = eval_strips("procedural:eval", 1)[0]
    heads = agg["meta"]["heads"]["gaze"]
    for t in (2, 5):  # at the run's strength the sweep is the vqa protocol; at B=1 it is a generate call at B=1
        assert by[("strength", "gaze", f"{t}@d=10000")]["answer"] == by[("vqa", "gaze", t)]["answer"]
        assert by[("paraphrase", "gaze", f"{t}@q{question_id(vqa_q)}")]["answer"] == by[("vqa", "gaze", t)]["answer"]
        g = generate(loaded_qwen3, strip.image, vqa_q, heads=[tuple(h) for h in heads], target=Panel(t),
                     panels=strip.panels, strength=1.0, max_new_tokens=3)
        assert by[("strength", "gaze", f"{t}@d=1")]["answer"] == g.text
        g = generate(loaded_qwen3, strip.image, "What is shown?", heads=[tuple(h) for h in heads], target=Panel(t),
                     panels=strip.panels, strength=1e4, max_new_tokens=3)
        assert by[("paraphrase", "gaze", f"{t}@q{question_id('What is shown?')}")]["answer"] == g.text
    s = agg["protocols"]["strength"]
    assert set(s) == {"gaze", "random"} and set(s["gaze"]) == {"1", "10000"} and s["gaze"]["1"]["n"] == 2
    mean = sum(by[("strength", "gaze", f"{t}@d=1")]["correct"] for t in (2, 5)) / 2
    assert s["gaze"]["1"]["accuracy"] == pytest.approx(mean)
    assert list(agg["protocols"]["paraphrase"]["none"]) == questions  # in the order asked
    result = json.loads((tmp_path / "e" / PARAPHRASE_DISCOVERY).read_text())
    assert result["templates"] == [loaded_qwen3.prompts.discovery, "What is in the {ordinal} panel?"]
    for template, top in zip(result["templates"], result["top"]):  # each wording's own discovery, re-read
        r = Ranking.load(tmp_path / "e" / "paraphrase-discovery" / f"q{question_id(template)}" / "ranking.json")
        assert [tuple(h) for h in top] == r.top(2)
    assert result["overlap"][0][0] == result["overlap"][1][1] == 2
    assert result["overlap"][0][1] == len({tuple(h) for h in result["top"][0]} & {tuple(h) for h in result["top"][1]})
    assert run_eval(cfg, loaded=loaded_qwen3, progress=False)["cost"]["new_records"] == 0  # resumed: nothing new
    text = write_report(tmp_path / "e").read_text()
    for fig in ("strength", "paraphrase", "paraphrase_discovery"):
        assert (tmp_path / "e" / "figures" / f"{fig}.png").exists() and f"figures/{fig}.png" in text, fig
    assert "What is shown?" in text and "Accuracy vs steering strength" in text
