"""`gaze probe reading-order` end to end on tiny models: the direction is the difference of means of the
captured pairs, the identity ordering's direction is zero and changes nothing, a damaged run resumes to the
same numbers, bad input is refused before any model loads, and it runs on every family."""

from __future__ import annotations

import json

import pytest
import torch

from gaze.cli import main
from gaze.errors import GazeError

FAST = ["--n-strips", "2", "--panel-size", "32", "--answer-tokens", "1", "--n-boot", "50", "--quiet"]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from gaze.testing import build_tiny_vlm

    return build_tiny_vlm("qwen3_vl", tmp_path_factory.mktemp("probe-qwen3"), num_layers=3)


@pytest.fixture(scope="module")
def ranking_file(qwen3_dir, tmp_path_factory):
    from gaze.ranking import Ranking

    scores = torch.zeros(3, 4)
    scores[1, 2], scores[2, 0] = 0.9, 0.5
    path = tmp_path_factory.mktemp("ranking") / "ranking.json"
    Ranking(model_id=str(qwen3_dir), scores=scores, matrices=torch.zeros(3, 4, 6, 6), n_strips=1,
            prompt="q").save(path)
    return path


@pytest.fixture(scope="module")
def probed(qwen3_dir, ranking_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-run")
    argv = ["probe", "reading-order", "--model", str(qwen3_dir), "--out", str(out), *FAST, "--orderings", "1",
            "--ordering", "1,2,3,4,5,6", "--narration-strips", "1", "--narration-tokens", "10",
            "--ranking", str(ranking_file), "--top-k", "2"]
    assert main(argv) == 0
    return out, argv


def test_files_figures_and_report_exist(probed):
    out, _ = probed
    agg = json.loads((out / "aggregate.json").read_text())
    for name in ("flip_vs_layer", "logit_diff_vs_layer", "orderings_hist", "silhouette_vs_layer"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "97% at layer 22" in report and "91.3%" in report and "-0.78" in report and "65%" in report
    assert set(agg["layers"]) == {"0", "1", "2"} and agg["meta"]["n_layers"] == 3
    assert agg["gaze_heads"]["per_layer"] == [0, 1, 1] and agg["gaze_heads"]["k"] == 2
    assert len(agg["silhouette"]["per_layer"]) == 3
    for layer in agg["layers"].values():
        assert layer["flip"]["n"] == 6 and 0 <= layer["flip"]["mean"] <= 1  # one held-out strip x 6 panels
    names = [r["name"] for r in agg["orderings"]["rows"]]
    assert names[:2] == ["reverse", "reverse as an order"] and "identity" in names and len(names) == 4
    assert agg["narration"]["n"] == 1 and agg["narration"]["layers"] == agg["band"]


def test_the_direction_is_the_difference_of_means_of_the_captured_pairs(probed, qwen3_dir):
    from safetensors.torch import load_file

    from gaze.eval.probe import Prompts, QUESTION, REVERSE_PREFIX, ORDER_PREFIX, NARRATION_PROMPT
    from gaze.eval.protocols import eval_strips
    from gaze.generation import prepare_inputs
    from gaze.models import load
    from gaze.residual import capture_residual

    out, _ = probed
    got = load_file(str(out / "directions.safetensors"))["reverse"]  # [L, H]
    loaded = load(str(qwen3_dir), device="cpu")
    build = eval_strips("procedural:eval", 2, align=loaded.family.merged_patch(loaded.processor), panel_size=32)[0::2]
    prompts = Prompts(QUESTION, REVERSE_PREFIX, ORDER_PREFIX, NARRATION_PROMPT)
    acts = {"normal": [], "reverse": []}
    for s in build:
        for k in range(1, 7):
            for kind in acts:
                inputs, _ = prepare_inputs(loaded, s.image, getattr(prompts, kind)(k))
                with torch.no_grad(), capture_residual(loaded.model, None, positions=-1) as cap:
                    loaded.model(**inputs)
                acts[kind].append(cap.activations[:, 0].double())  # [L, H]
    hand = torch.stack(acts["reverse"]).mean(0) - torch.stack(acts["normal"]).mean(0)
    assert got.shape == hand.shape and float(hand.abs().max()) > 0
    assert torch.allclose(got.double(), hand, atol=1e-5)


def test_the_identity_ordering_has_a_zero_direction_and_changes_nothing(probed):
    out, _ = probed
    agg = json.loads((out / "aggregate.json").read_text())
    rows = {r["name"]: r for r in agg["orderings"]["rows"]}
    ident = rows["identity"]
    assert ident["norm"] == 0.0 and ident["cosine_with_reverse"] is None
    assert ident["flip"] is None  # no question has another answer under the identity
    assert ident["changed"]["mean"] == 0.0 and ident["changed"]["n"] == 6
    # reverse in the ordering sweep is the layer sweep's own direction, at the ordering layer
    rev = rows["reverse"]
    assert rev["flip"] == agg["layers"][str(agg["orderings"]["layer"])]["flip"]
    assert abs(rev["cosine_with_reverse"] - 1.0) < 1e-6


def test_a_damaged_run_resumes_to_the_same_numbers(probed):
    out, argv = probed
    before = (out / "aggregate.json").read_text()
    items = sorted((out / "items").rglob("*.*"))
    pairs = [p for p in items if p.parent.name == "pairs"]
    layers = [p for p in items if p.parent.name == "layers"]
    orders = [p for p in items if p.parent.name == "orderings"]
    assert len(pairs) == 2 and len(layers) == 1 and len(orders) == 4  # reverse, reverse as an order, identity, one drawn
    pairs[0].unlink()
    layers[0].write_text("{ not json")
    orders[0].write_bytes(b"")
    assert main(argv) == 0
    assert (out / "aggregate.json").read_text() == before
    assert all(p.exists() for p in items)


def test_other_settings_in_the_same_folder_are_refused_before_loading(probed, capsys, monkeypatch):
    import gaze.models

    out, argv = probed
    monkeypatch.setattr(gaze.models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main([*argv, "--alpha", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gaze probe: error:") and "other settings" in err and "alpha" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("bad, says", [
    (["--question", "Which letter?"], "{ordinal}"),
    (["--order-prefix", "Read in order, "], "{order}"),
    (["--strips", "/nowhere/strips"], "not found"),
    (["--ranking", "/nowhere/ranking.json"], "not found"),
    (["--skip", "everything"], "--skip"),
    (["--dtype", "float7"], "dtype"),
])
def test_bad_input_is_one_line_before_any_model_loads(bad, says, tmp_path, capsys, monkeypatch):
    import gaze.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gaze.models, "load", no_load)
    assert main(["probe", "reading-order", "--model", "/nowhere/model", "--out", str(tmp_path), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gaze probe: error:") and says in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("bad", [["--orderings", "721"], ["--n-strips", "1"], ["--ordering", "1,2,2"],
                                 ["--layers", "5-3"], ["--alpha", "nan"]])
def test_bad_numbers_are_refused_at_parse_time(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["probe", "reading-order", "--out", str(tmp_path), *bad])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_orderings_sample_is_seeded_and_always_holds_reverse():
    from gaze.eval.probe import orderings

    a, b = orderings(6, 5, seed=3), orderings(6, 5, seed=3)
    assert a == b and [o.name for o in a[:2]] == ["reverse", "reverse as an order"] and len(a) == 7
    assert len(orderings(6, 720, seed=0)) == 721  # 719 others, reverse, and reverse as an order
    with pytest.raises(GazeError):
        orderings(6, 0, seed=0, extra=((1, 2, 3),))


def test_silhouette_and_spearman_helpers():
    import numpy as np

    from gaze.eval.probe import described_order, reversed_rho, silhouette

    x = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
    assert silhouette(x, [1, 1, 2, 2]) > 0.95 and silhouette(x, [1, 2, 1, 2]) < 0
    caps = ["a cat sleeps", "a dog runs", "a bird flies"]
    text = "Panel 1: the bird flies. Panel 2: the dog runs. Panel 3: the cat sleeps."
    assert described_order(text, caps) == [3, 2, 1] and reversed_rho([3, 2, 1], 3) == 1.0
    assert reversed_rho([1, 2, 3], 3) == -1.0 and reversed_rho([2], 3) is None


FAMILY_RUN = dict(n_strips=2, panel_size=32, answer_tokens=1, n_boot=20, narration_strips=1, narration_tokens=4,
                  skip=("orderings",), no_report=True)


@pytest.fixture(scope="module")
def base_tokenizer():
    from gaze.testing import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize("family", sorted(__import__("gaze.testing", fromlist=["FAMILIES"]).FAMILIES))
def test_runs_on_every_family(family, tmp_path, base_tokenizer):
    from gaze.eval.probe import ProbeConfig, probe
    from gaze.models import load
    from gaze.testing import build_tiny_vlm

    folder = build_tiny_vlm(family, tmp_path / "model", tokenizer=base_tokenizer, num_layers=2)
    loaded = load(str(folder), device="cpu")
    agg = probe(ProbeConfig(model=str(folder), out=str(tmp_path / "out"), **FAMILY_RUN), loaded=loaded,
                progress=False)
    assert set(agg["layers"]) == {"0", "1"} and agg["competence"]["normal"]["n"] == 12
    assert agg["narration"]["n"] == 1 and (tmp_path / "out" / "aggregate.json").exists()


def test_the_probes_reverse_prompt_is_the_question_the_organism_was_trained_on():
    """The probe asks the shipped organism exactly the reverse letter question its training asked, and both
    are the paper's prefix before the question (so the reverse panel question is built the same way)."""
    from gaze.eval.probe import ProbeConfig, prompts_for
    from gaze.prompts import (LETTER_QUESTION, REVERSE_LETTER_QUESTION, REVERSE_QUESTION, SHORT_PANEL_QUESTION,
                              Prompts, in_reverse)

    from gaze.models import resolve

    probe = prompts_for(ProbeConfig(model="organism"))
    trained = Prompts.for_model(resolve("organism"))
    for k in range(1, 7):
        assert probe.reverse(k) == trained.reverse_letter.format(ordinal=probe.normal(k).split()[-2])
    assert REVERSE_LETTER_QUESTION == in_reverse(LETTER_QUESTION) == "Read the comic in reverse, which letter is on the {ordinal} panel?"
    assert REVERSE_QUESTION == in_reverse(SHORT_PANEL_QUESTION)
    assert REVERSE_QUESTION == "Read the comic in reverse, what is happening in the {ordinal} panel from the left?"
