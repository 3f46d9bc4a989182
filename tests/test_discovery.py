"""Discovery: the shared-prefix path equals full prefills and the eager reference; planted heads rank first."""

import json
import pytest
import torch
from PIL import Image

from conftest import PlantedHead, digit_reader

from gaze.attention import active
from gaze.discovery import DiscoveryError, discover
from gaze.models import load
from gaze.ranking import Ranking, RankingError
from gaze.scoring import gaze_scores, reference_strip_matrices, strip_matrices
from gaze.strips import StripError, load_strips, save_folder_strip

PLANT = (1, 3)  # (layer, head) made to look at the queried panel


def planted(loaded, strip):
    from gaze.generation import prepare_inputs
    from gaze.regions import panel_regions

    _, layout = prepare_inputs(loaded, strip.image, "x")
    regions = panel_regions(layout, strip.panels)
    positions = [layout.positions[regions.token_indices(k)].tolist() for k in range(strip.n_panels)]
    return PlantedHead(*PLANT, positions, digit_reader(loaded.processor.tokenizer))


def test_shared_prefix_equals_full_prefills_and_reference(loaded, tiny_path, strip_for):
    patch = loaded.family.merged_patch(loaded.processor)
    strip = strip_for(patch, seed=1)
    shared = strip_matrices(loaded.model, loaded.processor, strip)
    full = strip_matrices(loaded.model, loaded.processor, strip, share_prefix=False)
    eager = load(str(tiny_path), device="cpu", attn_implementation="eager")
    ref = reference_strip_matrices(eager.model, eager.processor, strip)
    n_layers, n_heads = loaded.n_layers, loaded.n_heads
    assert shared.shape == (n_layers, n_heads, 6, 6)
    assert (shared - full).abs().max() <= 1e-5
    assert (shared - ref).abs().max() <= 1e-5
    assert float(shared.sum(-1).max()) <= 1 + 1e-5  # raw mass: a row sums to the image share, at most 1


def test_shared_prefix_pass_never_runs_the_last_layers_mlp_or_the_logits(loaded, strip_for):
    strip = strip_for(loaded.family.merged_patch(loaded.processor), seed=2)
    text = loaded.model.model.language_model
    calls = {"mlp": 0, "head": 0}
    hooks = [text.layers[-1].mlp.register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1)),
             loaded.model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))]
    try:
        shared = strip_matrices(loaded.model, loaded.processor, strip)
        assert calls == {"mlp": 0, "head": 0}
        full = strip_matrices(loaded.model, loaded.processor, strip, share_prefix=False)
        assert calls["mlp"] == 6 and calls["head"] == 6  # the full prefills do run them
    finally:
        for h in hooks:
            h.remove()
    assert (shared - full).abs().max() <= 1e-5


def test_planted_head_ranks_first(loaded, strip_for, tmp_path):
    patch = loaded.family.merged_patch(loaded.processor)
    strips = [strip_for(patch, seed=s) for s in range(3)]
    with active(planted(loaded, strips[0])):
        ranking = discover(loaded, strips, tmp_path / "run", progress=False)
    assert ranking.top(1) == [PLANT]
    m = ranking.matrices[PLANT]
    assert float(torch.diagonal(m).mean()) > 0.5
    assert torch.allclose(ranking.scores, gaze_scores(ranking.matrices))


def test_discovery_resumes_to_the_same_ranking(loaded_qwen3, strip_for, tmp_path):
    loaded = loaded_qwen3
    strips = [strip_for(32, seed=s) for s in range(4)]
    whole = discover(loaded, strips, tmp_path / "whole", progress=False)

    def interrupted():
        yield from strips[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        discover(loaded, interrupted(), tmp_path / "resumed", progress=False)
    assert len(list((tmp_path / "resumed" / "strips").glob("*.safetensors"))) == 2
    resumed = discover(loaded, strips, tmp_path / "resumed", progress=False)
    assert torch.equal(whole.scores, resumed.scores)
    assert torch.equal(whole.matrices, resumed.matrices)
    assert resumed.n_strips == 4


def _truncate(files):
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])


def _alter(files):
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0x40  # a bit of the last stored number
    files[0].write_bytes(bytes(data))


def _swap(files):
    files[0].write_bytes(files[1].read_bytes())


def _older_format(files):
    from safetensors.torch import load_file, save_file

    from gaze.discovery import _scored_as

    strip_id, strip_hash = _scored_as(files[0])
    save_file(load_file(str(files[0])), str(files[0]), metadata={"strip_id": strip_id, "strip_hash": strip_hash})


@pytest.mark.parametrize("damage, why", [(_truncate, "truncated"), (_alter, "altered"), (_swap, "swapped"),
                                         (_older_format, "older version")])
def test_a_damaged_strip_file_is_named_and_rescored(loaded_qwen3, strip_for, tmp_path, capsys, damage, why):
    from gaze.discovery import merge, strip_file

    strips = [strip_for(32, seed=s) for s in range(2)]
    out = tmp_path / "run"
    whole = discover(loaded_qwen3, strips, out, progress=False)
    files = [strip_file(out, i) for i in range(2)]
    capsys.readouterr()
    damage(files)
    with pytest.raises(DiscoveryError, match=why) as e:  # merging what is on disk names the file
        merge(out, model_id=loaded_qwen3.model_id, template=whole.prompt)
    assert str(files[0]) in str(e.value)
    again = discover(loaded_qwen3, strips, out, progress=False)  # resuming rescores it, naming it
    err = capsys.readouterr().err
    assert f"{files[0]} cannot be reused" in err and why in err and str(files[1]) not in err
    assert torch.equal(again.scores, whole.scores) and torch.equal(again.matrices, whole.matrices)


def test_output_folder_of_another_run_is_refused(loaded_qwen3, strip_for, tmp_path):
    strips = [strip_for(32)]
    discover(loaded_qwen3, strips, tmp_path / "run", progress=False)
    with pytest.raises(DiscoveryError, match="other settings"):
        discover(loaded_qwen3, strips, tmp_path / "run", template="Which letter is on the {ordinal} panel?",
                 progress=False)


def test_a_retrained_model_of_the_same_id_does_not_resume_old_strips(tmp_path, strip_for):
    """Same id and shape, other weights (a model retrained into its folder): a clear error, not stale scores."""
    from gaze.models import load
    from gaze.testing import build_tiny_vlm

    strips = [strip_for(32)]
    build_tiny_vlm("qwen3_vl", tmp_path / "m", seed=1)
    discover(load(str(tmp_path / "m"), device="cpu"), strips, tmp_path / "run", progress=False)
    again = discover(load(str(tmp_path / "m"), device="cpu"), strips, tmp_path / "run", progress=False)  # same weights
    assert again.n_strips == 1
    build_tiny_vlm("qwen3_vl", tmp_path / "m", seed=2)
    with pytest.raises(DiscoveryError, match="weights"):
        discover(load(str(tmp_path / "m"), device="cpu"), strips, tmp_path / "run", progress=False)


def test_ranking_round_trip_and_mismatch(loaded_qwen3, tmp_path):
    scores = torch.rand(loaded_qwen3.n_layers, loaded_qwen3.n_heads)
    r = Ranking("m", scores, torch.rand(*scores.shape, 6, 6), 7, "q {ordinal}", meta={"source": "x"})
    path = r.save(tmp_path / "r")
    back = Ranking.load(path.parent)
    assert torch.equal(back.scores, r.scores) and torch.equal(back.matrices, r.matrices)
    assert back.top(3) == r.top(3) and back.meta == r.meta and back.n_strips == 7
    assert back.check(loaded_qwen3.model) is back
    other = Ranking("m", torch.rand(3, 5), torch.rand(3, 5, 6, 6), 1, "q")
    with pytest.raises(RankingError, match="3 layers x 5 heads"):
        other.check(loaded_qwen3.model)
    with pytest.raises(RankingError, match="not 'other/model'"):
        r.check(loaded_qwen3.model, "other/model")
    with pytest.raises(RankingError, match="run `gaze discover"):
        Ranking.load(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RankingError, match="not a valid ranking"):
        Ranking.load(tmp_path / "bad.json")


def test_strip_sources_and_bad_input(strip_for, tmp_path):
    strip = strip_for(32, seed=2)
    for i in range(3):
        save_folder_strip(strip, tmp_path / "comics" / f"comic{i + 1}")
    got = list(load_strips(tmp_path / "comics", align=32))
    assert [s.strip_id for s in got] == ["comic1", "comic2", "comic3"]
    assert got[0].captions == strip.captions
    assert list(got[0].image.getdata()) == list(strip.image.getdata())  # exact round trip
    assert len(list(load_strips(tmp_path / "comics", n_strips=2))) == 2
    # a single image split into equal panels
    strip.image.save(tmp_path / "one.png")
    (single,) = load_strips(tmp_path / "one.png")
    assert single.panels == strip.panels
    (boxed,) = load_strips(tmp_path / "one.png", panel_boxes=[(0, 0, 64, 64), (64, 0, 384, 64)])
    assert boxed.panels == ((0, 0, 64, 64), (64, 0, 384, 64))
    # missing panel, extra panel, unreadable panel
    (tmp_path / "comics" / "comic2" / "p4.png").unlink()
    with pytest.raises(StripError, match="p4 is missing"):
        list(load_strips(tmp_path / "comics"))
    (tmp_path / "comics" / "comic2" / "p4.png").write_bytes(b"not an image")
    with pytest.raises(StripError, match="cannot read image"):
        list(load_strips(tmp_path / "comics"))
    Image.new("RGB", (8, 8)).save(tmp_path / "comics" / "comic2" / "p4.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "comics" / "comic1" / "p7.png")
    with pytest.raises(StripError, match="more than 6 panels"):
        list(load_strips(tmp_path / "comics"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StripError, match="no comic folders"):
        list(load_strips(tmp_path / "empty"))
    with pytest.raises(StripError, match="not found"):
        list(load_strips(tmp_path / "nowhere"))


def test_not_a_vlm_is_a_clear_error(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gaze.families import UnsupportedModelError

    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "text")
    with pytest.raises(UnsupportedModelError, match="not a vision-language model"):
        load(str(tmp_path / "text"))


def test_cli_discover(qwen3_path, strip_for, tmp_path, capsys):
    from gaze.cli import main

    for i in range(2):
        save_folder_strip(strip_for(32, seed=i), tmp_path / "comics" / f"comic{i}")
    rc = main(["discover", "--model", str(qwen3_path), "--strips", str(tmp_path / "comics"), "--n-strips", "2",
               "--out", str(tmp_path / "out"), "--quiet", "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "top 3 gaze heads" in out and "sit in layers" in out
    data = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert data["n_strips"] == 2
    rc = main(["discover", "--model", str(qwen3_path), "--strips", str(tmp_path / "nowhere"), "--out",
               str(tmp_path / "o2"), "--quiet"])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_cli_discover_into_an_old_folder_scores_the_strips_asked_for(qwen3_path, strip_for, tmp_path, capsys):
    """Another --start / --n-strips, or strips changed on disk, rescore: never the old strips' ranking."""
    from gaze.cli import main

    comics = tmp_path / "comics"
    for i in range(3):
        save_folder_strip(strip_for(32, seed=i), comics / f"comic{i}")
    common = ["discover", "--model", str(qwen3_path), "--strips", str(comics), "--quiet"]

    def run(out, *extra):
        assert main([*common, "--out", str(tmp_path / out), *extra]) == 0, capsys.readouterr().err
        capsys.readouterr()
        return Ranking.load(tmp_path / out)

    # a failed run (no such strips) leaves the folder usable by the corrected command
    assert main(["discover", "--model", str(qwen3_path), "--strips", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "run"), "--quiet"]) == 2
    first = run("run", "--start", "0", "--n-strips", "2")
    assert first.meta["strip_ids"] == ["comic0", "comic1"]
    moved = run("run", "--start", "1", "--n-strips", "2")
    assert moved.meta["strip_ids"] == ["comic1", "comic2"]
    assert torch.equal(moved.scores, run("fresh", "--start", "1", "--n-strips", "2").scores)
    shorter = run("run", "--start", "1", "--n-strips", "1")
    assert shorter.n_strips == 1 and torch.equal(shorter.scores, run("one", "--start", "1", "--n-strips", "1").scores)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["id"] for s in manifest["strips"]] == ["comic1"] and len(manifest["strips"][0]["hash"]) == 16
    # the strip changed on disk under the same name: rescored
    save_folder_strip(strip_for(32, seed=7), comics / "comic1")
    changed = run("run", "--start", "1", "--n-strips", "1")
    assert torch.equal(changed.scores, run("seven", "--start", "1", "--n-strips", "1").scores)
    assert not torch.equal(changed.scores, shorter.scores)


def _eager_variants(eager, strip) -> dict:
    """Every score variant written out from eager attention (`output_attentions`) and the value projections,
    one full prefill per question: the reference for what `gaze discover` stores."""
    from gaze.generation import prepare_inputs
    from gaze.prompts import panel_question

    text = eager.model.model.language_model
    rows, norms = [], []
    for k in range(1, strip.n_panels + 1):
        values = {}
        hooks = [layer.self_attn.v_proj.register_forward_hook(
            lambda mod, args, out, i=i: values.__setitem__(i, out)) for i, layer in enumerate(text.layers)]
        try:
            inputs, layout = prepare_inputs(eager, strip.image, panel_question(k))
            with torch.no_grad():
                attentions = eager.model(**inputs, output_attentions=True, use_cache=False).attentions
        finally:
            for h in hooks:
                h.remove()
        rows.append(torch.stack([a[0, :, -1, :] for a in attentions]).float())  # [L, H, S]
        per_layer = []
        for i in range(len(text.layers)):
            cfg = text.config
            v = values[i][0].float().view(values[i].shape[1], cfg.num_key_value_heads, -1)  # [S, Hkv, D]
            n = v.norm(dim=-1).T.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=0)
            per_layer.append(n)  # [H, S]
        norms.append(torch.stack(per_layer))  # [L, H, S]
    p = min(r.shape[-1] for r in rows)  # the shared prefix holds every image token
    image = torch.stack([r[..., :p] for r in rows], dim=2)[..., layout.positions]  # [L, H, Q, T]
    vnorm = torch.stack([n[..., :p] for n in norms], dim=2)[..., layout.positions]  # [L, H, Q, T]
    member = torch.zeros(strip.n_panels, layout.n_tokens)  # [R, T]: token centre inside the panel box
    for r, (x0, y0, x1, y1) in enumerate(strip.panels):
        cx, cy = layout.centres[:, 0], layout.centres[:, 1]
        member[r] = ((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)).float()
    raw = torch.einsum("lhqt,rt->lhqr", image, member)
    floor, mean = image.min(dim=2).values, image.mean(dim=(2, 3))  # [L, H, T], [L, H]
    keep = (floor < 3.0 * mean[..., None]).float()[:, :, None, :]  # not a sink token
    return {"raw": raw, "selectivity": raw / raw.sum(-1, keepdim=True),
            "value_weighted": torch.einsum("lhqt,rt->lhqr", image * vnorm, member),
            "sink_excluded": torch.einsum("lhqt,rt->lhqr", image * keep, member)}


def test_what_gaze_discover_stores_equals_the_eager_reference_for_every_variant(qwen3_path, strip_for, tmp_path,
                                                                                capsys):
    """The shipped path (`gaze discover`: shared prefix, fused SDPA, rows recomputed, early stop) against
    eager attention written out by hand, for the raw score and every variant."""
    from safetensors.torch import load_file

    from gaze.cli import main

    for i in range(2):
        save_folder_strip(strip_for(32, seed=20 + i), tmp_path / "comics" / f"comic{i}")
    assert main(["discover", "--model", str(qwen3_path), "--strips", str(tmp_path / "comics"), "--out",
                 str(tmp_path / "run"), "--quiet"]) == 0
    eager = load(str(qwen3_path), device="cpu", attn_implementation="eager")
    strips = list(load_strips(str(tmp_path / "comics"), align=32))
    refs = [_eager_variants(eager, s) for s in strips]
    for i, ref in enumerate(refs):
        got = load_file(str(tmp_path / "run" / "strips" / f"{i:06d}.safetensors"))
        assert set(got) == set(ref)
        for name in ref:
            assert (got[name] - ref[name]).abs().max() <= 1e-5, name
    ranking = Ranking.load(tmp_path / "run")
    for name in refs[0]:
        mean = torch.stack([r[name] for r in refs]).mean(0)
        expected = torch.diagonal(mean, dim1=-2, dim2=-1).mean(-1)  # gaze score: mean diagonal over strips
        assert torch.allclose(torch.tensor(ranking.meta["variant_scores"][name]), expected, atol=1e-5), name
    assert torch.allclose(ranking.scores, torch.diagonal(torch.stack([r["raw"] for r in refs]).mean(0),
                                                         dim1=-2, dim2=-1).mean(-1), atol=1e-5)


def test_cli_discover_mapping_proportional_is_centre_on_aligned_strips_and_the_mapped_boxes_otherwise(
        qwen3_path, loaded_qwen3, strip_for, tmp_path, capsys):
    from dataclasses import replace

    from gaze.cli import main
    from gaze.discovery import discover
    from gaze.generation import proportional_panels
    from gaze.ranking import Ranking

    for i in range(2):  # token-aligned panels edge to edge: the two mappings own the same tokens
        save_folder_strip(strip_for(32, seed=i), tmp_path / "comics" / f"comic{i}")
    common = ["discover", "--model", str(qwen3_path), "--strips", str(tmp_path / "comics"), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "c")]) == 0
    assert main([*common, "--out", str(tmp_path / "p"), "--mapping", "proportional"]) == 0
    centre, prop = (Ranking.load(tmp_path / d / "ranking.json") for d in ("c", "p"))
    assert torch.allclose(centre.scores, prop.scores)
    # unaligned (a 6 px gap between panels): the CLI scores the official column split's boxes
    assert main([*common, "--gap", "6", "--out", str(tmp_path / "g"), "--mapping", "proportional"]) == 0
    from gaze.strips import load_strips

    strips = load_strips(str(tmp_path / "comics"), align=loaded_qwen3.family.merged_patch(loaded_qwen3.processor),
                         gap=6)
    want = discover(loaded_qwen3, [replace(s, panels=proportional_panels(loaded_qwen3, s)) for s in strips],
                    tmp_path / "api", progress=False)
    assert torch.allclose(Ranking.load(tmp_path / "g" / "ranking.json").scores, want.scores)
    capsys.readouterr()
