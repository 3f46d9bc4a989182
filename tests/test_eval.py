"""Evaluation: statistics on known data, head sets, the resumable log, and a tiny end-to-end run with a report."""

import argparse
import json
import math
import random
import re

import numpy as np
import pytest
import torch

from gaze.eval.cli import config_from_args, main, register
from gaze.eval.config import AGGREGATE, RECORDS, EvalConfig, EvalError, resolve_preset
from gaze.eval.controls import ControlSpec
from gaze.eval.heads import PriorScores, head_sets, random_pool
from gaze.eval.protocols import aggregate, derangement, run_eval, segments, size_class
from gaze.eval.records import RecordLog, record_key
from gaze.eval.statistics import bootstrap_ci, spearman
from gaze.ranking import Ranking


# ---------------------------------------------------------------- statistics

def test_bootstrap_on_known_data():
    assert bootstrap_ci([1.0] * 50) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([0.0] * 50) == (0.0, 0.0, 0.0)
    x = np.random.default_rng(1).random(400) < 0.3  # Bernoulli(0.3)
    mean, lo, hi = bootstrap_ci(x, n_boot=4000, seed=0)
    assert lo < mean < hi and lo < 0.3 < hi
    expected = 2 * 1.96 * np.sqrt(mean * (1 - mean) / x.size)  # normal-approximation width
    assert abs((hi - lo) - expected) < 0.2 * expected
    assert bootstrap_ci(x, n_boot=500, seed=3) == bootstrap_ci(x, n_boot=500, seed=3)
    assert all(np.isnan(bootstrap_ci([])))


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.integers(1, 5, 12), rng.integers(1, 7, 12)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    assert spearman([1], [2]) is None


def test_derangement_never_keeps_a_panel_in_place():
    rng = random.Random(0)
    for _ in range(200):
        order = derangement(6, rng)
        assert sorted(order) == [1, 2, 3, 4, 5, 6]
        assert all(p != i + 1 for i, p in enumerate(order))
    assert derangement(6, random.Random("s")) == derangement(6, random.Random("s"))


def test_segments_follow_the_schedule_index():
    pieces = ["a", "b", "c", "d", "e"]
    assert segments(pieces, [0, 0, 1, 1, 1], 3, 2) == ["ab", "cde", ""]
    assert segments(pieces, None, 3, 2) == ["ab", "cd", "e"]  # unsteered: what the schedule would have been
    assert [size_class(n) for n in (1, 2, 3, 8, 9)] == ["small", "small", "medium", "medium", "large"]


# ---------------------------------------------------------------- head sets

def _ranking(n_layers=4, n_heads=8) -> Ranking:
    scores = torch.arange(n_layers * n_heads, dtype=torch.float32).flip(0).reshape(n_layers, n_heads) / 100
    return Ranking("m", scores, torch.zeros(n_layers, n_heads, 6, 6), 3, "q")


def test_head_sets_conditions():
    r = _ranking()
    widened = ControlSpec("bottom-p", 1, widen=True)
    sets = head_sets(r, 3, seed=0, kinds=("gaze", "random", "all", "none"), control=widened)
    assert sets["gaze"] == [(0, 0), (0, 1), (0, 2)]
    assert len(sets["random"]) == 3 and not set(sets["random"]) & set(sets["gaze"])
    pool = random_pool(r, 3, percentile=5.0, widen=True)
    assert len(pool) == 6 and set(sets["random"]) <= set(pool)  # bottom 5% widened to 2K heads
    assert set(pool) == set(r.order()[-6:])
    # not widened (the default): the bottom 5% of 32 heads is 2 heads, fewer than K, and both are drawn
    assert head_sets(r, 3, seed=0)["random"] == sorted(r.order()[-2:]) == sorted(random_pool(r, 3))
    assert sets["all"] == r.order() and sets["none"] == []
    assert head_sets(r, 3, seed=0, control=widened)["random"] == sets["random"]  # seeded
    assert any(head_sets(r, 3, seed=s, control=widened)["random"] != sets["random"] for s in range(1, 6))
    z = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    prior = PriorScores(image_mass=z, image_z=z, votes=torch.zeros(4, 8), entropy=torch.full((4, 8), math.nan),
                        n_strips=1, n_samples=6)
    ps = head_sets(r, 2, kinds=("image", "localization"), prior=prior)
    assert ps["image"][0] == divmod(int(z.flatten().argmax()), 8)
    assert ps["localization"] == ps["image"]  # no votes, no entropy: by image mass
    with pytest.raises(EvalError, match="prior"):
        head_sets(r, 2, kinds=("image",))


# ---------------------------------------------------------------- records

def _rec(key, protocol="vqa", condition="gaze", target=1, correct=True, **kw):
    return {"key": key, "protocol": protocol, "condition": condition, "k": 2, "strip_id": key, "target": target,
            "correct": correct, "matched": target if correct else None, "degenerate": False, **kw}


def test_record_log_drops_a_broken_last_line_and_duplicates(tmp_path):
    path = tmp_path / RECORDS
    good = [_rec("a"), _rec("b")]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + json.dumps(_rec("a")) + "\n" + '{"key": "c", "pro')
    log = RecordLog(path)
    assert sorted(log.records) == ["a", "b"] and log.dropped == 2
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2
    log.append(_rec("c"))
    log.append(_rec("c"))
    assert [json.loads(l)["key"] for l in path.read_text().splitlines()] == ["a", "b", "c"]


def test_aggregate_does_not_depend_on_record_order():
    recs = [_rec(f"s{i}", target=i % 6 + 1, correct=i % 3 == 0) for i in range(30)]
    a = aggregate(recs, n_boot=300, seed=1)
    b = aggregate(list(reversed(recs)), n_boot=300, seed=1)
    assert a == b
    g = a["protocols"]["vqa"]["gaze"]
    assert g["n"] == 30 and g["accuracy"] == pytest.approx(10 / 30)
    assert g["ci"][0] <= g["accuracy"] <= g["ci"][1]
    assert sum(v["n"] for v in g["per_panel"].values()) == 30


# ---------------------------------------------------------------- CLI

def test_register_adds_eval_with_the_config_flags():
    parser = argparse.ArgumentParser(prog="gaze")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", "m", "--ranking", "r", "--strips", "procedural:eval", "--n-strips", "3",
                              "--out", "o", "--protocols", "vqa,dynamic", "--conditions", "gaze,random",
                              "--top-k", "4", "--ks", "1,2,4,8", "--every", "5", "--seed", "2", "--judge", "letter",
                              "--max-new-tokens", "9", "--device", "cpu", "--dtype", "bfloat16",
                              "--question", "vqa=Which panel?", "--scene-size", "256x128"])
    cfg = config_from_args(args)
    assert cfg.protocols == ("vqa", "dynamic") and cfg.conditions == ("gaze", "random")
    assert (cfg.top_k, cfg.ks, cfg.every, cfg.seed, cfg.judge, cfg.max_new_tokens) == (4, (1, 2, 4, 8), 5, 2, "letter", 9)
    assert cfg.question("vqa") == "Which panel?" and cfg.question("narration") == "Which letter is on this panel?"
    assert cfg.scene_size == (256, 128) and args.func.__name__ == "cmd_eval"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--protocols", "vqa,nope"])


# ---------------------------------------------------------------- end to end on a tiny random model

def test_tiny_end_to_end_eval_and_report(loaded_qwen3, qwen3_path, tiny_ranking, tmp_path):
    from gaze.eval.report import write_report

    cfg = EvalConfig(model=str(qwen3_path), preset="organism", ranking=str(tiny_ranking), strips="procedural:eval",
                     n_strips=1,
                     out=str(tmp_path / "eval"), top_k=2, ks=(1, 2), targets=(2,), every=1, max_new_tokens=3,
                     narration_tokens=4, n_scenes=1, n_objects=2, prior_strips=1, n_boot=200,
                     control_draws=2)
    agg = run_eval(cfg, loaded=loaded_qwen3, progress=False)
    out = tmp_path / "eval"
    for name in (RECORDS, AGGREGATE, "trajectories.json", "prior_heads.json", "ranking.json", "eval.json"):
        assert (out / name).exists(), name
    p = agg["protocols"]
    assert set(p) == {"vqa", "narration", "dynamic", "region", "sweep"}
    assert set(p["vqa"]) == {"gaze", "random", "all", "image", "localization", "none"}
    assert agg["meta"]["complete"] and agg["meta"]["top_k"] == 2 and p["vqa"]["all"]["k"] == 8

    def check(entry):
        acc, (lo, hi) = entry.get("accuracy", entry.get("segment_accuracy")), entry["ci"]
        assert 0 <= lo <= acc <= hi <= 1

    for proto in ("vqa", "narration", "region", "dynamic"):
        for entry in p[proto].values():
            check(entry)
    for by_k in p["sweep"].values():
        assert set(by_k) == {"1", "2"}
        for entry in by_k.values():
            check(entry)
    records = [json.loads(l) for l in (out / RECORDS).read_text().splitlines()]
    assert len({r["key"] for r in records}) == len(records) == agg["n_records"]
    dyn = [r for r in records if r["protocol"] == "dynamic"]
    assert all(len(r["segments"]) == 6 and sorted(r["schedule"]) != r["schedule"] for r in dyn)
    assert all(len(r["trajectory"][0]) == 6 for r in dyn if r.get("trajectory"))
    assert {r["size_class"] for r in records if r["protocol"] == "region"} <= {"small", "medium", "large", "none"}

    readme = write_report(out)
    text = readme.read_text()
    assert "Ours vs the paper" in text and "83.1%" in text and "gaze eval" in text
    for fig in ("matrices", "score_map", "accuracy", "accuracy_vs_k", "staircase", "dynamic", "region"):
        png = out / "figures" / f"{fig}.png"
        assert png.exists() and 0 < png.stat().st_size < 200_000, fig
        assert f"figures/{fig}.png" in text


def test_resume_after_interruption_gives_the_same_aggregate(qwen3_path, tiny_ranking, tmp_path, capsys):
    common = ["--model", str(qwen3_path), "--preset", "organism", "--ranking", str(tiny_ranking),
              "--strips", "procedural:eval",
              "--n-strips", "2", "--protocols", "vqa", "--conditions", "gaze,none", "--targets", "3",
              "--top-k", "2", "--max-new-tokens", "2", "--n-boot", "200", "--device", "cpu", "--quiet", "--no-report"]
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    assert main([*common, "--out", str(fresh)]) == 0
    assert main([*common, "--out", str(resumed), "--limit", "2"]) == 0
    partial = json.loads((resumed / AGGREGATE).read_text())
    assert not partial["meta"]["complete"] and partial["n_records"] == 2
    with (resumed / RECORDS).open("a") as fh:  # a write cut short by the interruption
        fh.write('{"key": "vqa|none|seed-1000000|3|0", "protocol": "vq')
    assert main([*common, "--out", str(resumed)]) == 0
    a, b = (json.loads((d / AGGREGATE).read_text()) for d in (fresh, resumed))
    assert a["protocols"] == b["protocols"] and b["meta"]["complete"] and b["n_records"] == 4
    keys = [json.loads(l)["key"] for l in (resumed / RECORDS).read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 4
    assert record_key("vqa", "none", "seed-1000000", 3, 0) in keys
    assert main([*common, "--out", str(resumed), "--top-k", "1"]) == 2  # other settings: refused, not mixed
    assert "other settings" in capsys.readouterr().err


# ---------------------------------------------------------------- protocol plumbing with a scripted model

class ScriptedContext:
    """A stand-in for `Context` whose "model" answers with a caption chosen by a rule, so that the
    bookkeeping (keys, judging, segments, Spearman, aggregation) is checked on known answers."""

    def __init__(self, cfg, answer_panel):
        from gaze.eval.judges import CaptionJudge

        self.cfg, self.answer_panel = cfg, answer_panel  # (strip, heads, target) -> panel to describe
        self.judge = self.candidate_judge = CaptionJudge()
        self.track_heads = []

    def ask(self, strip, question, heads, target=None, schedule=None, max_new_tokens=24, track=()):
        from types import SimpleNamespace

        if schedule is not None:  # narration: steered heads follow the schedule, else left to right
            said = [t.k for t in schedule.targets] if heads else list(range(1, 7))
            pieces = [p for k in said for p in [strip.captions[k - 1] + ". "] + [""] * (self.cfg.every - 1)]
            targets = [j for j in range(len(said)) for _ in range(self.cfg.every)] if heads else None
        else:
            pieces = [strip.captions[self.answer_panel(strip, heads, target.k) - 1]]
            targets = None
        g = SimpleNamespace(text="".join(pieces).strip(), token_ids=list(range(len(pieces))), pieces=pieces,
                            targets=targets, degenerate=False, tracker=None)
        return g, 0.0


def test_protocols_count_known_answers(tmp_path):
    from gaze.eval.protocols import dynamic_narration, eval_strips, vqa

    strips = eval_strips("procedural:eval", 4)
    cfg = resolve_preset(EvalConfig(every=3, seed=0))
    # steered heads obey the target; with no heads the model always describes panel 1
    ctx = ScriptedContext(cfg, lambda strip, heads, k: k if heads else 1)
    records = list(vqa(ctx, strips, "gaze", [(0, 0)], 1)) + list(vqa(ctx, strips, "none", [], 0))
    records += list(dynamic_narration(ctx, strips, "gaze", [(0, 0)], 1))
    records += list(dynamic_narration(ctx, strips, "none", [], 0))
    assert len({r["key"] for r in records}) == len(records) == 4 * 6 * 2 + 4 * 2
    p = aggregate(records, n_boot=200)["protocols"]
    # steered to panel 1, the answer is the unsteered one: the baseline-identical rule makes it a miss
    assert p["vqa"]["gaze"]["accuracy"] == pytest.approx(5 / 6) and p["vqa"]["gaze"]["identical"] == pytest.approx(1 / 6)
    assert p["vqa"]["gaze"]["judged_accuracy"] == 1.0 and p["vqa"]["gaze"]["per_panel"]["1"]["accuracy"] == 0
    assert p["vqa"]["none"]["identical"] is None
    assert p["vqa"]["none"]["accuracy"] == pytest.approx(1 / 6)
    assert p["vqa"]["none"]["per_panel"]["1"]["accuracy"] == 1.0 and p["vqa"]["none"]["per_panel"]["4"]["accuracy"] == 0
    assert p["vqa"]["none"]["matched_share"] == {"1": 1.0}
    assert p["dynamic"]["gaze"]["segment_accuracy"] == 1.0 and p["dynamic"]["gaze"]["spearman"]["mean"] == 1.0
    # unsteered, the model narrates left to right: rho is the schedule's correlation with 1..6
    dyn = [r for r in records if r["protocol"] == "dynamic" and r["condition"] == "none"]
    for r in dyn:
        assert r["described"] == [1, 2, 3, 4, 5, 6]
        assert r["spearman"] == pytest.approx(spearman(r["schedule"], [1, 2, 3, 4, 5, 6]))
    # done keys are skipped: nothing is generated again
    done = {r["key"] for r in records}
    assert list(vqa(ctx, strips, "gaze", [(0, 0)], 1, done=done)) == []


# ---------------------------------------------------------------- resume integrity: one test per corruption kind

def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _resealed(rec, **changes):
    """A record changed and given a valid digest again (as a copy from elsewhere would carry)."""
    from gaze.eval.records import _digest

    rec = {**rec, **changes}
    rec["digest"] = _digest(rec)
    return rec


def _cut_mid_file(path):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0][: len(lines[0]) // 2] + "\n" + "".join(lines[1:]))


def _alter(path):
    recs = _lines(path)
    recs[0]["correct"] = not recs[0]["correct"]
    _write(path, recs)


def _swap(path):  # the first line holds the second one's fields under the first one's key
    recs = _lines(path)
    recs[0] = _resealed(recs[1], key=recs[0]["key"])
    _write(path, recs)


def _other_run(path):
    recs = _lines(path)
    recs[0] = _resealed(recs[0], identity="0123456789abcdef")
    _write(path, recs)


def _other_strip(path):
    recs = _lines(path)
    recs[0] = _resealed(recs[0], strip_hash="0123456789abcdef")
    _write(path, recs)


def _older_format(path):
    recs = _lines(path)
    recs[0] = {k: v for k, v in recs[0].items() if k not in ("identity", "digest")}
    _write(path, recs)


@pytest.mark.parametrize("damage, why", [
    (_cut_mid_file, "truncated"), (_alter, "altered"), (_swap, "swapped"), (_other_run, "stale: written by a run"),
    (_other_strip, "stale: strip"), (_older_format, "stale: written by an older version")])
def test_resume_names_and_recomputes_a_damaged_record(loaded_qwen3, qwen3_path, tiny_ranking, tmp_path, capsys,
                                                       damage, why):
    cfg = EvalConfig(model=str(qwen3_path), preset="organism", ranking=str(tiny_ranking), strips="procedural:eval",
                     n_strips=2,
                     out=str(tmp_path / "eval"), protocols=("vqa",), conditions=("gaze", "none"), top_k=2,
                     targets=(2,), max_new_tokens=2, n_boot=100)
    fresh = run_eval(cfg, loaded=loaded_qwen3, progress=False)
    path = tmp_path / "eval" / RECORDS
    first = _lines(path)[0]
    assert len(first["digest"]) == len(first["identity"]) == len(first["strip_hash"]) == 16
    damage(path)
    capsys.readouterr()
    again = run_eval(cfg, loaded=loaded_qwen3, progress=True)
    err = capsys.readouterr().err
    assert f"{path}: line 1 " in err and why in err and "recomputing it" in err
    assert re.search(r"eval: 100%.* 1/1 \[\d\d:\d\d<\d\d:\d\d", err)  # the bar: done/total [elapsed<ETA]
    assert again["protocols"] == fresh["protocols"] and again["n_records"] == fresh["n_records"] == 4
    assert again["cost"]["new_records"] == 1
    assert _lines(path)[-1]["key"] == first["key"]


def test_targets_beyond_the_strips_panels_are_refused_before_generating(loaded_qwen3, qwen3_path, tiny_ranking,
                                                                         tmp_path):
    cfg = EvalConfig(model=str(qwen3_path), preset="organism", ranking=str(tiny_ranking), strips="procedural:eval",
                     n_strips=1,
                     out=str(tmp_path / "eval"), protocols=("vqa",), conditions=("none",), targets=(2, 7))
    with pytest.raises(EvalError, match="--targets 7: the strips have 6 panels"):
        run_eval(cfg, loaded=loaded_qwen3, progress=False)
    assert not (tmp_path / "eval" / RECORDS).exists()


def test_the_manifest_names_the_hosted_judge_without_its_credentials(tmp_path):
    from types import SimpleNamespace

    from gaze.eval.protocols import _check_manifest, _manifest

    loaded, r = SimpleNamespace(model_id="m"), _ranking()
    a = EvalConfig(judge="hosted", judge_endpoint="https://user:secret@judge-a.example/v1?key=abc")
    m = _manifest(a, loaded, r, 3)
    assert m["judge_endpoint"] == "https://judge-a.example/v1" and m["judge_api"] == "openai"
    assert "secret" not in json.dumps(m) and "abc" not in json.dumps(m)
    _check_manifest(tmp_path, m)  # written
    _check_manifest(tmp_path, m)  # the same run resumes
    for other in (EvalConfig(judge="hosted", judge_endpoint="https://judge-b.example/v1"),
                  EvalConfig(judge="hosted", judge_endpoint=a.judge_endpoint, judge_api="anthropic")):
        with pytest.raises(EvalError, match="other settings"):  # another judge: refused, not mixed in
            _check_manifest(tmp_path, _manifest(other, loaded, r, 3))
