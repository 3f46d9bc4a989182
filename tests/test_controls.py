"""Controls (bottom-p, layer-band, layer-matched draws; p-value; strip-clustered paired bootstrap) and the
prior head criteria (MaskCD's z-score, Kang et al.'s elbow and spatial entropy), on hand data with known
answers, then end to end on a tiny model."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from gaze.eval.cli import main
from gaze.eval.config import AGGREGATE, RECORDS, EvalConfig, EvalError
from gaze.eval.controls import ControlSpec, band_layers, control_draws, control_summary, control_warning
from gaze.eval.heads import (elbow_value, head_overlap, jaccard, label8, layer_zscores, localization_votes,
                             overlap_table, prior_from_maps, spatial_entropy, token_maps)
from gaze.eval.protocols import aggregate, run_eval
from gaze.eval.statistics import empirical_p, paired_strip_bootstrap
from gaze.ranking import Ranking


def _ranking(n_layers=6, n_heads=8, seed=0) -> Ranking:
    scores = torch.rand(n_layers, n_heads, generator=torch.Generator().manual_seed(seed))
    return Ranking("m", scores, torch.zeros(n_layers, n_heads, 6, 6), 3, "q")


# ---------------------------------------------------------------- control draws

def test_band_layers_generalise_the_papers_layers_20_to_35_of_36():
    assert band_layers(36, (0.55, 1.0)) == list(range(20, 36))
    assert band_layers(36, (20 / 36, 1.0)) == list(range(20, 36))
    assert band_layers(28, (0.55, 1.0)) == list(range(16, 28))  # Qwen3-VL-2B's depth
    assert band_layers(4, (0.55, 1.0)) == [3]
    assert band_layers(4, (0.0, 0.5)) == [0, 1]


@pytest.mark.parametrize("kind", ["bottom-p", "layer-band", "layer-matched"])
def test_control_draws_are_seeded_distinct_and_never_the_top_k(kind):
    r = _ranking()
    k = 5
    spec = ControlSpec(kind, draws=6, band=(0.5, 1.0), percentile=40.0)
    draws = control_draws(r, k, spec, seed=1)
    top = set(r.top(k))
    assert len(draws) == 6 and all(len(d) == k and not set(d) & top for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    assert control_draws(r, k, spec, seed=1) == draws
    assert control_draws(r, k, spec, seed=2) != draws
    if kind == "bottom-p":
        pool = set(r.order()[-math.ceil(48 * 0.4):])
        assert all(set(d) <= pool for d in draws)
    if kind == "layer-band":
        assert all(l in (3, 4, 5) for d in draws for l, _ in d)
    if kind == "layer-matched":
        hist = Counter(l for l, _ in r.top(k))
        assert all(Counter(l for l, _ in d) == hist for d in draws)


def test_a_small_pool_is_reported_not_widened():
    r = _ranking()  # 48 heads: the bottom 5% is 3 heads
    spec = ControlSpec("bottom-p", draws=2)
    message = control_warning(r, 5, spec)
    assert "hold 3 heads, fewer than K = 5" in message and "--control-widen" in message
    assert all(len(d) == 3 for d in control_draws(r, 5, spec))
    widened = ControlSpec("bottom-p", draws=2, widen=True)
    assert control_warning(r, 5, widened) is None and all(len(d) == 5 for d in control_draws(r, 5, widened))
    with pytest.raises(EvalError, match="--control"):
        ControlSpec("nope").check()
    with pytest.raises(EvalError, match="--control-band"):
        EvalConfig(control_band=(0.8, 0.2)).check()


# ---------------------------------------------------------------- gaze vs control statistics

def test_empirical_p_value():
    assert empirical_p(0.8, [0.1, 0.2, 0.3]) == 1 / 4
    assert empirical_p(0.2, [0.1, 0.2, 0.3]) == 3 / 4
    assert empirical_p(0.0, []) == 1.0


def test_paired_strip_bootstrap_resamples_strips_with_their_pairs():
    pairs = [("a", 1.0), ("a", 0.0), ("b", 1.0), ("c", -1.0), ("c", 0.0), ("c", 0.0)]
    mean, lo, hi = paired_strip_bootstrap(pairs, n_boot=500, seed=3)
    assert mean == pytest.approx(1 / 6)
    # reference: the same strip draws, each resampled strip contributing all of its pairs
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 3, (500, 3))
    by_strip = {"a": [1.0, 0.0], "b": [1.0], "c": [-1.0, 0.0, 0.0]}
    names = ["a", "b", "c"]
    ref = [np.mean([d for i in row for d in by_strip[names[i]]]) for row in idx]
    assert (lo, hi) == pytest.approx((np.percentile(ref, 2.5), np.percentile(ref, 97.5)))
    assert paired_strip_bootstrap([("a", 0.5), ("b", 0.5)]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in paired_strip_bootstrap([]))


def _rec(condition, strip, target, correct, draw=None):
    r = {"protocol": "vqa", "condition": condition, "strip_id": strip, "target": target, "correct": correct,
         "k": 2, "matched": target if correct else None, "degenerate": False,
         "key": f"vqa|{condition}|{strip}|{target}|2"}
    return r if draw is None else {**r, "draw": draw}


def test_control_summary_on_known_records():
    # 2 strips x 2 targets; gaze right on 3 of 4; draws right on 0, 1 and 4 of 4
    gaze = [_rec("gaze", s, t, not (s == "s1" and t == 2)) for s in ("s0", "s1") for t in (1, 2)]
    wins = {0: set(), 1: {("s0", 1)}, 2: {("s0", 1), ("s0", 2), ("s1", 1), ("s1", 2)}}
    controls = [_rec(f"random:{d}", s, t, (s, t) in wins[d], d) for d in wins for s in ("s0", "s1") for t in (1, 2)]
    out = control_summary(gaze, controls, n_boot=200)
    assert out["per_draw"] == {"0": 0.0, "1": 0.25, "2": 1.0}
    assert out["mean"] == pytest.approx(5 / 12) and out["sd"] == pytest.approx(np.std([0, 0.25, 1], ddof=1))
    assert (out["min"], out["max"], out["gaze"]) == (0.0, 1.0, 0.75)
    assert out["p_value"] == pytest.approx((1 + 1) / (1 + 3))  # one draw (1.0) beats 0.75
    # per pair: gaze minus the draws' mean; (s0,1): 1 - 2/3, (s0,2): 1 - 1/3, (s1,1): 1 - 1/3, (s1,2): 0 - 1/3
    assert out["difference"]["mean"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3 - 1 / 3) / 4)
    assert out["difference"]["n_pairs"] == 4 and out["difference"]["n_strips"] == 2
    lo, hi = out["difference"]["ci"]
    assert lo <= out["difference"]["mean"] <= hi
    # aggregate pools the draws under `random` and attaches the summary
    agg = aggregate(gaze + controls, n_boot=200)["protocols"]["vqa"]
    assert set(agg) == {"gaze", "random"} and agg["random"]["n"] == 12
    assert agg["random"]["accuracy"] == pytest.approx(5 / 12) and agg["random"]["draws"] == out


# ---------------------------------------------------------------- MaskCD's z-score, Kang et al.'s criteria

def test_layer_zscore_rule():
    mass = torch.tensor([[0.0] * 7 + [1.0], [0.0] * 6 + [1.0, 1.0], [0.3] * 8], dtype=torch.float64)
    z = layer_zscores(mass)
    assert z[0, 7] == pytest.approx(math.sqrt(7)) and z[0, 7] > 2.5  # a lone outlier among 8 heads
    assert z[1, 7] == pytest.approx(math.sqrt(3)) and z[1, 7] < 2.5
    assert torch.all(z[2] == 0)  # a constant layer
    maps = mass.reshape(3, 8, 1, 1).repeat(1, 1, 1, 2) / 2  # [L, H, 1, 2]: the same masses
    prior = prior_from_maps([maps], n_strips=1)
    assert prior.image_head_set() == [(0, 7)] and prior.image_heads(3)[:2] == [(0, 7), (1, 6)]


def test_elbow_by_chord_distance():
    # sorted (0, 0, 0, 0, 1, 10) against the chord from (0, 0) to (5, 10): distances ~ 0, 10, 20, 30, 35, 0
    assert elbow_value([10, 0, 1, 0, 0, 0]) == 1.0
    assert elbow_value([3.0, 3.0]) == 3.0 and elbow_value([]) == 0.0


def test_connected_components_and_spatial_entropy_on_a_hand_map():
    a = np.zeros((4, 4))
    a[0, 0] = a[1, 1] = 0.3  # diagonal neighbours: one component with 8-connectivity
    a[3, 3] = 0.2
    labels, n = label8(a > 0)
    assert n == 2 and labels[0, 0] == labels[1, 1] == 1 and labels[3, 3] == 2
    se, _ = spatial_entropy(a)  # mean 0.05: masses 0.25 + 0.25 and 0.15 out of 0.65
    p = np.array([0.5, 0.15]) / 0.65
    assert se == pytest.approx(-(p * np.log(p)).sum())
    assert spatial_entropy(np.full((3, 3), 0.1))[0] == math.inf  # nothing above the mean
    assert spatial_entropy(a * 0 + np.eye(4))[0] == pytest.approx(0.0)  # one diagonal component


def test_label8_equals_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((7, 9)) < rng.uniform(0.2, 0.7)
        labels, n = label8(mask)
        ref, m = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n == m and np.array_equal(labels, ref)


def test_localization_votes_follow_kangs_filters():
    maps = torch.zeros(4, 2, 3, 3, dtype=torch.float64)  # [L, H, rows, cols]
    maps[0, 0, 1, 1] = 0.9  # focused but in layer 0: excluded
    maps[2, 0, 1, 1] = 0.8  # focused, one component: entropy 0
    maps[2, 1, 0, 0] = maps[2, 1, 0, 2] = 0.4  # two separate spots: entropy log 2
    maps[3, 0, 2, :] = 0.3  # the whole bottom row: excluded
    maps[3, 1, 0, 1] = 0.01  # below the elbow (the sorted sums 0, 0, .01, .02, .8, .8, .9, .9 bend at .02)
    maps[1, 1, 0, 1] = 0.02
    assert elbow_value(maps.sum((2, 3)).flatten().tolist()) == pytest.approx(0.02)
    votes, entropy = localization_votes(maps, per_sample=2)
    assert votes.nonzero().tolist() == [[2, 0], [2, 1]]
    assert entropy[2, 0] == pytest.approx(0.0) and entropy[2, 1] == pytest.approx(math.log(2))
    assert math.isinf(entropy[0, 0]) and math.isinf(entropy[3, 0]) and math.isinf(entropy[3, 1])
    prior = prior_from_maps([maps, maps], n_strips=1)
    assert prior.localization_heads(2) == [(2, 0), (2, 1)] and prior.localization_head_set() == [(2, 0), (2, 1)]
    assert prior.votes[2, 0] == 2 and prior.n_samples == 2


def test_token_maps_rasterise_a_layout():
    from gaze.regions import grid_layout

    layout = grid_layout(0, (2, 3), (96, 64), (96, 64))
    rows = torch.arange(6.0).reshape(1, 6)
    assert token_maps(rows, layout).tolist() == [[[0, 1, 2], [3, 4, 5]]]
    from dataclasses import replace

    assert token_maps(rows, replace(layout, grid=None)).tolist() == [[[0, 1, 2], [3, 4, 5]]]


def test_jaccard_and_overlap_table():
    assert jaccard([(0, 0), (0, 1)], [(0, 1), (1, 1)]) == 1 / 3 and jaccard([], []) == 1.0
    assert head_overlap({"a": [(0, 0)], "b": [(0, 0)], "c": []}) == {"a|b": 1.0, "a|c": 0.0, "b|c": 0.0}
    r = _ranking(2, 2)
    maps = torch.rand(2, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    table = overlap_table(r, prior_from_maps([maps], 1), ks=(1, 10, 100))
    assert table["ks"] == [1, 4] and table["jaccard"]["4"] == {"gaze|image": 1.0, "gaze|localization": 1.0,
                                                               "image|localization": 1.0}


# ---------------------------------------------------------------- end to end on a tiny random model

@pytest.fixture(scope="module")
def ranking_dir(loaded_qwen3, tmp_path_factory):
    from gaze.discovery import discover
    from gaze.eval.protocols import eval_strips

    out = tmp_path_factory.mktemp("controls-discovery")
    discover(loaded_qwen3, eval_strips("procedural:discovery", 2), out, progress=False)
    return out


def test_tiny_eval_with_control_draws_prior_heads_and_overlap(loaded_qwen3, qwen3_path, ranking_dir, tmp_path,
                                                               capsys):
    from gaze.eval.report import write_report

    out = tmp_path / "eval"
    cfg = EvalConfig(model=str(qwen3_path), ranking=str(ranking_dir), strips="procedural:eval", n_strips=2,
                     out=str(out), protocols=("vqa",), conditions=("gaze", "random", "image", "localization"),
                     top_k=2, targets=(2, 3), max_new_tokens=2, prior_strips=1, n_boot=100,
                     control="layer-band", control_draws=3)
    agg = run_eval(cfg, loaded=loaded_qwen3, progress=False)
    records = [json.loads(l) for l in (out / RECORDS).read_text().splitlines()]
    randoms = [r for r in records if r["condition"].startswith("random")]
    assert sorted({r["condition"] for r in randoms}) == ["random:0", "random:1", "random:2"]
    assert all(r["draw"] == int(r["condition"][-1]) and r["control"] == "layer-band" for r in randoms)
    assert len(randoms) == 3 * 2 * 2
    vqa = agg["protocols"]["vqa"]
    assert set(vqa) == {"gaze", "random", "image", "localization"}
    draws = vqa["random"]["draws"]
    assert draws["n_draws"] == 3 and draws["difference"]["n_pairs"] == 4 and 0 < draws["p_value"] <= 1
    meta = agg["meta"]
    n_layers = meta["n_layers"]
    assert meta["control"]["band_layers"] == band_layers(n_layers, (0.55, 1.0))
    for d in range(3):
        assert all(l in meta["control"]["band_layers"] for l, _ in meta["heads"][f"random:{d}"])
    overlap = meta["overlap"]
    n_total = meta["n_total_heads"]
    assert overlap["ks"] == sorted({min(10, n_total), min(100, n_total)})
    assert set(overlap["jaccard"][str(min(10, n_total))]) == {"gaze|image", "gaze|localization", "image|localization"}
    prior = json.loads((out / "prior_heads.json").read_text())
    assert prior["n_samples"] == 6 and prior["n_strips"] == 1  # the six panel-query prompts of one strip
    text = write_report(out).read_text()
    assert "## Controls" in text and "layer-band" in text and "p-value" in text
    assert "## Head-set overlap" in text and "gaze vs image" in text
    # a changed control setting is refused, not mixed into the same records
    args = ["--model", str(qwen3_path), "--ranking", str(ranking_dir), "--n-strips", "2", "--protocols", "vqa",
            "--conditions", "gaze,random,image,localization", "--top-k", "2", "--targets", "2,3",
            "--max-new-tokens", "2", "--prior-strips", "1", "--n-boot", "100", "--control", "layer-band",
            "--device", "cpu", "--quiet", "--no-report", "--out", str(out)]
    capsys.readouterr()
    assert main([*args, "--control-draws", "3"]) == 0  # the same settings: resumed, nothing new
    again = json.loads((out / AGGREGATE).read_text())
    assert again["cost"]["new_records"] == 0 and again["protocols"] == agg["protocols"]
    assert main([*args, "--control-draws", "4"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "control_draws" in err
