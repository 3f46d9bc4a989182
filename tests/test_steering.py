"""Steering invariants on tiny models: zero is nothing, only chosen heads move, the eager reference agrees."""

import threading

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gaze.attention import _ACTIVE, active
from gaze.generation import generate, prepare_inputs, repetition_rate
from gaze.regions import RegionError, panel_regions
from gaze.scoring import RowRecorder
from gaze.steering import Box, Panel, Schedule, Steering, Tokens, parse_schedule, steer
from gaze.tracking import Tracker

QUESTION = "What is the main action happening in this comic strip? Answer briefly."


@pytest.fixture(scope="module")
def setup(loaded, strip_for):
    strip = strip_for(loaded.family.merged_patch(loaded.processor), seed=5)
    inputs, layout = prepare_inputs(loaded, strip.image, QUESTION)
    return strip, inputs, layout


def _logits(loaded, inputs):
    with torch.no_grad():
        return loaded.model(**inputs).logits


def test_zero_strength_or_no_heads_is_exactly_unsteered(loaded, setup):
    strip, inputs, layout = setup
    base = _logits(loaded, inputs)
    n = inputs["input_ids"].shape[1]
    with steer(loaded.model, [(0, 1), (1, 2)], Panel(3), inputs=inputs, panels=strip.panels, strength=0.0):
        assert torch.equal(_logits(loaded, inputs), base)
    with steer(loaded.model, [], Panel(3), inputs=inputs, panels=strip.panels):
        assert torch.equal(_logits(loaded, inputs), base)
    plain = generate(loaded, strip.image, QUESTION, max_new_tokens=6)
    zero = generate(loaded, strip.image, QUESTION, heads=[(1, 0)], target=2, panels=strip.panels, strength=0.0,
                    max_new_tokens=6)
    assert plain.token_ids == zero.token_ids


def test_only_chosen_heads_change_and_they_look_at_the_target(loaded, setup):
    strip, inputs, layout = setup
    last = loaded.n_layers - 1
    chosen = [(last, 1), (last, 2)]
    n = inputs["input_ids"].shape[1]
    base, steered = RowRecorder(), RowRecorder()
    with torch.no_grad():
        with active(base):
            loaded.model(**inputs)
        with steer(loaded.model, chosen, Panel(4), inputs=inputs, panels=strip.panels), active(steered):
            loaded.model(**inputs)
    for layer in range(loaded.n_layers):
        for head in range(loaded.n_heads):
            same = torch.equal(base.records[layer][:, head], steered.records[layer][:, head])
            assert same == ((layer, head) not in chosen), (layer, head)
    regions = panel_regions(layout, strip.panels)
    for _, head in chosen:
        image = steered.records[last][0, head, layout.positions]
        on_target = float(image[regions.token_indices(3)].sum())
        assert on_target / float(image.sum()) > 0.999


def _reference_bias(layout, member, kv, strength):
    bias = torch.zeros(kv)
    bias[layout.positions] = -strength
    bias[layout.positions[member]] = strength
    return bias


def test_matches_eager_reference_with_bias_in_the_mask(loaded, tiny_path, setup):
    """Reference: eager attention where the chosen heads get +B/-B added to their attention mask."""
    from gaze.models import load
    from gaze.regions import box_membership

    strip, inputs, layout = setup
    chosen = {(0, 2), (1, 0), (1, 3)}
    box = (0, 0, strip.image.size[0] // 2, strip.image.size[1])
    member = box_membership(layout, box)
    strength = 3.0  # soft, so the comparison is not trivially saturated

    def eager_biased(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, dim=1)
        v = value.repeat_interleave(rep, dim=1)
        scores = query @ k.transpose(-1, -2) * scaling  # [B, H, q, kv]
        q_len, kv = scores.shape[-2:]
        causal = torch.ones(q_len, kv, dtype=torch.bool).tril(kv - q_len)
        scores = scores.masked_fill(~causal, float("-inf"))
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else scores + attention_mask
        for (l, h) in chosen:
            if l == module.layer_idx:
                scores[:, h] = scores[:, h] + _reference_bias(layout, member, kv, strength)
        return (torch.softmax(scores.float(), -1).to(query.dtype) @ v).transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_eager_biased", eager_biased)
    AttentionMaskInterface.register("test_eager_biased", sdpa_mask)
    ref = load(str(tiny_path), device="cpu")
    ref.model.set_attn_implementation({"text_config": "test_eager_biased"})
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        expected = ref.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected_logits = ref.model(**inputs).logits
        with steer(loaded.model, sorted(chosen), Box(box), inputs=inputs, strength=strength):
            got_logits = loaded.model(**inputs).logits
            got = loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert (got_logits - expected_logits).abs().max() < 1e-4
    assert torch.equal(got, expected)


def test_schedule_switches_at_the_right_step(loaded, setup):
    strip, _, layout = setup
    heads = [(loaded.n_layers - 1, h) for h in range(loaded.n_heads)]
    schedule = Schedule((Panel(2), Panel(5), Panel(3), Panel(5)), every=3)
    out = generate(loaded, strip.image, QUESTION, heads=heads[:2], schedule=schedule, panels=strip.panels,
                   max_new_tokens=12, track=True)
    n = len(out.token_ids)
    expected = [min(t // 3, 3) for t in range(n)]
    assert out.targets == expected
    # the steered heads look at the scheduled panel at every step (a region may be revisited)
    regions = panel_regions(out.layout, strip.panels)
    looked = out.trajectory(regions).argmax(-1).tolist()
    assert looked == [[1, 4, 2, 4][i] for i in expected]


def test_explicit_steps_and_sentence_boundaries():
    layout = None
    hook = Steering(heads={}, n_heads=1, memberships=[], schedule=Schedule((Panel(1), Panel(2), Panel(3)), steps=(2, 5)),
                    layout=layout)
    for t in range(8):
        hook.on_forward(torch.tensor([[7]]))
    assert hook.applied == [0, 0, 1, 1, 1, 2, 2, 2]
    # at_sentence: after 2 tokens, wait for a token that ends a sentence (id 9 here)
    hook = Steering(heads={}, n_heads=1, memberships=[], schedule=Schedule((Panel(1), Panel(2)), every=2, at_sentence=True),
                    layout=layout, is_boundary=lambda t: t == 9)
    for token in [0, 5, 5, 5, 9, 5, 5]:  # the first forward is the prefill
        hook.on_forward(torch.tensor([[token]]))
    assert hook.applied == [0, 0, 0, 0, 1, 1, 1]


def test_two_threads_get_what_they_get_alone(loaded, setup):
    strip, _, _ = setup
    heads = [(loaded.n_layers - 1, 0), (loaded.n_layers - 1, 3), (0, 1)]
    jobs = {"plain": {}, "p2": dict(heads=heads, target=2), "p6": dict(heads=heads, target=6)}
    alone = {k: generate(loaded, strip.image, QUESTION, panels=strip.panels, max_new_tokens=16, **kw).token_ids
             for k, kw in jobs.items()}
    together, barrier = {}, threading.Barrier(len(jobs))

    def run(name):
        barrier.wait()
        together[name] = generate(loaded, strip.image, QUESTION, panels=strip.panels, max_new_tokens=16,
                                  **jobs[name]).token_ids

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert alone["p2"] != alone["plain"] or alone["p6"] != alone["plain"]  # steering did something


def test_nothing_remains_after_an_exception(loaded, setup):
    strip, inputs, layout = setup
    base = _logits(loaded, inputs)
    with pytest.raises(KeyError):
        with steer(loaded.model, [(0, 0)], Panel(2), inputs=inputs, panels=strip.panels):
            assert not torch.equal(_logits(loaded, inputs), base)
            raise KeyError("inside")
    assert _ACTIVE.get() == ()
    assert torch.equal(_logits(loaded, inputs), base)


def test_tokens_target_and_modes(loaded, setup):
    strip, inputs, layout = setup
    n = inputs["input_ids"].shape[1]
    pos = tuple(layout.positions[:3].tolist())
    for mode in ("boost", "suppress", "suppress_text"):
        rec = RowRecorder(layers={0})
        with torch.no_grad(), steer(loaded.model, [(0, 0)], Tokens(pos), inputs=inputs, mode=mode), active(rec):
            loaded.model(**inputs)
        row = rec.records[0][0, 0]
        image = row[layout.positions]
        assert float(image[:3].sum() / image.sum()) > 0.999
        if mode == "suppress_text":
            # the prompt's text keys are suppressed too: the head's mass sits on the target tokens
            assert float(image[:3].sum()) > 0.999


def test_bad_input_errors(loaded, setup):
    strip, inputs, layout = setup
    with pytest.raises(ValueError, match="outside the model"):
        with steer(loaded.model, [(99, 0)], Panel(1), inputs=inputs, panels=strip.panels):
            pass
    with pytest.raises(RegionError, match="out of range"):
        with steer(loaded.model, [(0, 0)], Panel(7), inputs=inputs, panels=strip.panels):
            pass
    with pytest.raises(RegionError, match="outside"):
        with steer(loaded.model, [(0, 0)], Box((5000, 0, 6000, 10)), inputs=inputs):
            pass
    with pytest.raises(RegionError, match="covers no image-token centre"):
        with steer(loaded.model, [(0, 0)], Box((0, 0, 3, 3)), inputs=inputs):
            pass
    with pytest.raises(ValueError, match="mode"):
        with steer(loaded.model, [(0, 0)], Panel(1), inputs=inputs, panels=strip.panels, mode="nope"):
            pass
    for bad, match in [("4,x,1", "bad schedule entry"), ("", "empty schedule"), ("4,9", "out of range"),
                       ("1,2", "switch interval")]:
        with pytest.raises(ValueError, match=match):
            parse_schedule(bad, every=None if match == "switch interval" else 5, n_panels=6)
    assert parse_schedule("4, 2,1", every=7).targets == (Panel(4), Panel(2), Panel(1))


def test_repetition_and_degenerate_flag():
    assert repetition_rate([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition_rate([1, 2] * 20) > 0.9
    assert repetition_rate([]) == 0.0


def test_tracker_heatmap_sums_to_image_mass(loaded, setup):
    strip, _, _ = setup
    heads = [(0, 1), (1, 2)]
    out = generate(loaded, strip.image, QUESTION, max_new_tokens=4, track=heads)
    tracker = out.tracker
    assert isinstance(tracker, Tracker)
    att = tracker.attention()
    assert att.shape[1:] == (2, out.layout.n_tokens)
    for step in range(att.shape[0]):
        assert torch.allclose(tracker.heatmap(step).sum(), att[step].mean(0).sum(), atol=1e-3)
        assert torch.allclose(att[step].sum(-1).mean(), tracker.image_share()[step], atol=1e-3)


def test_cli_steer_prints_both_answers_and_saves_trajectory(qwen3_path, strip_for, tmp_path, capsys):
    from gaze.cli import main
    from gaze.ranking import Ranking

    strip = strip_for(32, seed=9)
    strip.image.save(tmp_path / "strip.png")
    scores = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    Ranking(str(qwen3_path), scores, torch.zeros(2, 4, 6, 6), 1, "q").save(tmp_path / "rank")
    rc = main(["steer", "--model", str(qwen3_path), "--ranking", str(tmp_path / "rank"), "--image",
               str(tmp_path / "strip.png"), "--schedule", "2,4,3", "--every", "2", "--top-k", "3",
               "--max-new-tokens", "6", "--trajectory-out", str(tmp_path / "traj.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "unsteered:" in out and "steered:" in out
    assert (tmp_path / "traj.json").exists() and (tmp_path / "traj.png").exists()
    rc = main(["steer", "--model", str(qwen3_path), "--ranking", str(tmp_path / "rank"), "--image",
               str(tmp_path / "strip.png"), "--target", "9"])
    assert rc == 2 and "out of range" in capsys.readouterr().err


def test_prefill_only_steers_the_prompt_and_leaves_the_answer_rows_alone(loaded, setup):
    strip, inputs, layout = setup
    heads = [(loaded.n_layers - 1, h) for h in range(loaded.n_heads)]
    n = inputs["input_ids"].shape[1]
    with steer(loaded.model, heads, Panel(4), inputs=inputs, panels=strip.panels, phase="prefill") as hook:
        q, k = torch.zeros(1, loaded.n_heads, n, 8), torch.zeros(1, 2, n, 8)
        hook.on_forward(inputs["input_ids"])  # the prefill
        assert hook.bias(loaded.n_layers - 1, q, k) is not None
        hook.on_forward(torch.tensor([[5]]))  # a decode step
        assert hook.bias(loaded.n_layers - 1, q[:, :, -1:], torch.zeros(1, 2, n + 1, 8)) is None
    kw = dict(heads=heads, target=4, panels=strip.panels, track=True)
    full = generate(loaded, strip.image, QUESTION, max_new_tokens=6, **kw)
    pre = generate(loaded, strip.image, QUESTION, max_new_tokens=6, phase="prefill", **kw)
    assert pre.token_ids[0] == full.token_ids[0]  # the first answer token is picked by the steered prefill
    regions = panel_regions(pre.layout, strip.panels)
    mass = pre.trajectory(regions)  # [tokens, 6]
    assert mass[0, 3] > 0.99 and mass[0].sum() - mass[0, 3] < 1e-3  # the prefill's last row: on panel 4 alone
    if len(pre.token_ids) > 1:
        assert float(mass[1:, 3].max()) < 0.99  # the answer's rows: unbiased
    with pytest.raises(ValueError, match="schedule switches targets"):
        with steer(loaded.model, heads, schedule=Schedule((Panel(1), Panel(2)), every=2), inputs=inputs,
                   panels=strip.panels, phase="prefill"):
            pass
    with pytest.raises(ValueError, match="unknown steering phase"):
        with steer(loaded.model, heads, Panel(1), inputs=inputs, panels=strip.panels, phase="answer"):
            pass
    with pytest.raises(ValueError, match="prepare_inputs"):
        with steer(loaded.model, heads, Panel(1), inputs=dict(inputs), panels=strip.panels):
            pass


@pytest.mark.parametrize("phase", ["all", "prefill", "decode"])
def test_two_generations_in_one_block_are_steered_alike(loaded, setup, phase):
    """Per-generation state restarts at each prefill: the second `generate` is not left unsteered or part-way."""
    strip, inputs, _ = setup
    heads = [(loaded.n_layers - 1, h) for h in range(loaded.n_heads)]
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        alone = []
        for target in (Panel(4), Panel(2)):
            with steer(loaded.model, heads, target, inputs=inputs, panels=strip.panels, phase=phase):
                alone.append(loaded.model.generate(**inputs, **kw))
        unsteered = loaded.model.generate(**inputs, **kw)
        with steer(loaded.model, heads, Panel(4), inputs=inputs, panels=strip.panels, phase=phase) as hook:
            first = loaded.model.generate(**inputs, **kw)
            second = loaded.model.generate(**inputs, **kw)
            assert hook.generations == 2 and hook.applied == [0] * 8
    assert torch.equal(first, alone[0]) and torch.equal(second, alone[0])
    # the steering did something (else the test proves nothing) and depends on the target
    assert not torch.equal(alone[0], unsteered) or not torch.equal(alone[1], unsteered)


def test_two_generations_of_a_schedule_start_at_its_first_target(loaded, setup):
    strip, inputs, _ = setup
    heads = [(loaded.n_layers - 1, h) for h in range(loaded.n_heads)]
    schedule = Schedule((Panel(2), Panel(5), Panel(3)), every=2)
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        with steer(loaded.model, heads, schedule=schedule, inputs=inputs, panels=strip.panels) as hook:
            first = loaded.model.generate(**inputs, **kw)
            applied_first = list(hook.applied)
            second = loaded.model.generate(**inputs, **kw)
            applied_second = list(hook.applied)
    assert applied_first == applied_second == [0, 0, 1, 1, 2, 2, 2, 2]
    assert torch.equal(first, second)
    out = generate(loaded, strip.image, QUESTION, heads=heads, schedule=schedule, panels=strip.panels, max_new_tokens=8)
    again = generate(loaded, strip.image, QUESTION, heads=heads, schedule=schedule, panels=strip.panels,
                     max_new_tokens=8)
    assert out.token_ids == again.token_ids and out.targets == again.targets


def test_on_token_reports_each_token_with_its_target_and_attention(loaded, setup):
    strip, _, _ = setup
    heads = [(loaded.n_layers - 1, 0), (loaded.n_layers - 1, 1)]
    for phase, steered_tokens in (("all", None), ("prefill", {0})):
        events = []
        out = generate(loaded, strip.image, QUESTION, heads=heads, target=3, panels=strip.panels, max_new_tokens=5,
                       track=True, phase=phase, on_token=events.append)
        n = len(events)
        assert [e.index for e in events] == list(range(n)) and n >= len(out.token_ids)
        assert [e.token_id for e in events][: len(out.token_ids)] == out.token_ids
        expected = [0 if steered_tokens is None or t in steered_tokens else None for t in range(n)]
        assert [e.target for e in events] == expected
        att = out.tracker.attention()
        for e in events:
            assert e.layout is out.layout
            assert torch.allclose(e.attention, att[e.index].mean(0))


def test_default_k_is_the_papers_share_of_heads():
    from gaze.ranking import default_top_k

    assert default_top_k(1152) == 100  # the paper: 100 of Qwen3-VL-8B's 1,152 heads
    assert default_top_k(32) == 3  # the organism: ceil(2.78)
    assert default_top_k(8) == 1 and default_top_k(1) == 1  # at least one
    assert default_top_k(36 * 16) == 50


def test_cli_steer_default_k_is_printed_and_user_errors_are_one_line(qwen3_path, strip_for, tmp_path, capsys,
                                                                       monkeypatch):
    from gaze import cli
    from gaze.ranking import Ranking

    strip = strip_for(32, seed=9)
    strip.image.save(tmp_path / "strip.png")
    Ranking(str(qwen3_path), torch.arange(8, dtype=torch.float32).reshape(2, 4), torch.zeros(2, 4, 6, 6), 1,
            "q").save(tmp_path / "rank")
    args = ["steer", "--model", str(qwen3_path), "--ranking", str(tmp_path / "rank"), "--image",
            str(tmp_path / "strip.png"), "--target", "2", "--max-new-tokens", "3"]
    assert cli.main(args) == 0
    assert "steering the top 1 gaze heads of 8" in capsys.readouterr().out
    # a bug (not a GazeError) keeps its traceback instead of becoming a one-line "error"
    monkeypatch.setattr(cli, "cmd_steer", lambda a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(args)
