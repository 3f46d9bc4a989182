"""Live steering (re-targeting a running generation) and the cached image prefix, on tiny models."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from gaze.errors import GazeError
from gaze.generation import PrefixCache, compute_prefix, full_positions, generate, prepare_inputs
from gaze.regions import RegionError
from gaze.steering import Box, LiveTarget, Panel, Schedule, image_prefix_len, steer

QUESTION = "What is the main action happening in this comic strip? Answer briefly."
N = 10  # tokens per answer


@pytest.fixture(scope="module")
def setup(loaded, strip_for):
    strip = strip_for(loaded.family.merged_patch(loaded.processor), seed=7)
    heads = [(loaded.n_layers - 1, 0), (loaded.n_layers - 1, 1), (loaded.n_layers - 2, 2)]
    return strip, heads


class Callback(BaseStreamer):
    """A transformers streamer that calls fn(index) after each generated token (prompt skipped)."""

    def __init__(self, fn):
        self.fn, self.n = fn, -1

    def put(self, value):
        if self.n < 0:
            self.n = 0
            return
        for _ in value.reshape(-1).tolist():
            self.fn(self.n)
            self.n += 1

    def end(self):
        pass


def retarget_at(live: LiveTarget, plan: dict):
    """on_token callback: after token i is out, retarget to plan[i + 1] (so token i + 1 is steered by it)."""
    def on_token(event):
        if event.index + 1 in plan:
            live.retarget(plan[event.index + 1])
    return on_token


def test_retarget_at_step_n_is_a_schedule_switching_at_n(loaded, setup):
    strip, heads = setup
    for n in (1, 4):
        expected = generate(loaded, strip.image, QUESTION, heads=heads, panels=strip.panels, max_new_tokens=N,
                            schedule=Schedule((Panel(2), Panel(5)), steps=(n,)))
        live = LiveTarget(Panel(2))
        events = []

        def on_token(e, live=live, n=n):
            events.append(e)
            retarget_at(live, {n: Panel(5)})(e)

        got = generate(loaded, strip.image, QUESTION, heads=heads, panels=strip.panels, max_new_tokens=N,
                       target=live, on_token=on_token)
        assert got.token_ids == expected.token_ids
        k = len(got.token_ids)
        assert got.steered_by == [Panel(2) if t < n else Panel(5) for t in range(k)]
        assert got.targets == [0 if t < n else 1 for t in range(k)]
        assert [e.steered_by for e in events][:k] == got.steered_by
        assert [e.target for e in events][:k] == got.targets
    # a static target records itself at every token
    static = generate(loaded, strip.image, QUESTION, heads=heads, panels=strip.panels, max_new_tokens=N,
                      target=Panel(2))
    assert static.steered_by == [Panel(2)] * len(static.token_ids)


def test_retarget_to_none_is_the_unsteered_continuation(loaded, setup):
    """From the step of `retarget(None)` on, the logits are those of continuing the steered prefix unsteered."""
    strip, heads = setup
    model = loaded.model
    inputs, layout = prepare_inputs(loaded, strip.image, QUESTION)
    L, n, m = inputs["input_ids"].shape[1], 3, 5
    kw = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)
    live = LiveTarget(Panel(4))
    with steer(model, heads, live, inputs=inputs, panels=strip.panels) as hook:
        streamer = Callback(lambda i: live.retarget(None) if i == n - 1 else None)
        got = model.generate(**inputs, max_new_tokens=n + m, min_new_tokens=n + m, streamer=streamer, **kw)
    assert [hook.target_of(t) for t in range(n + m)] == [Panel(4)] * n + [None] * m
    # reference: n steered tokens, then the same cache continued with no hook at all
    with steer(model, heads, Panel(4), inputs=inputs, panels=strip.panels):
        first = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kw)
    seq = first.sequences
    pos = full_positions(loaded, inputs)
    pos = torch.cat([pos, pos[..., -1:] + torch.arange(1, n + 1).view(1, 1, -1)], dim=-1)
    cont = {k: v for k, v in inputs.items() if k not in ("pixel_values",)}
    cont.update(input_ids=seq, attention_mask=torch.ones_like(seq), position_ids=pos,
                past_key_values=first.past_key_values)
    if "mm_token_type_ids" in cont:
        cont["mm_token_type_ids"] = torch.cat([cont["mm_token_type_ids"],
                                               torch.zeros((1, n), dtype=cont["mm_token_type_ids"].dtype)], dim=1)
    rest = model.generate(**cont, max_new_tokens=m, min_new_tokens=m, **kw)
    assert torch.equal(got.sequences[0, : L + n], seq[0])
    assert torch.equal(got.sequences[0, L + n:], rest.sequences[0, L + n:])
    for a, b in zip(got.logits[:n], first.logits):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(got.logits[n:], rest.logits):
        assert torch.allclose(a, b, atol=1e-5)


def test_two_concurrent_generations_with_their_own_handles(loaded, setup):
    strip, heads = setup
    plans = [(Panel(1), {2: Panel(6), 5: None}), (None, {3: Panel(3), 6: Box((0, 0, 64, strip.image.size[1]))})]

    def run(start, plan):
        live = LiveTarget(start)
        return generate(loaded, strip.image, QUESTION, heads=heads, panels=strip.panels, max_new_tokens=N,
                        target=live, on_token=retarget_at(live, plan))

    alone = [run(*p) for p in plans]
    together: dict = {}
    barrier = threading.Barrier(len(plans))

    def worker(i):
        barrier.wait()
        for _ in range(2):
            together.setdefault(i, []).append(run(*plans[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(alone):
        for out in together[i]:
            assert out.token_ids == ref.token_ids and out.steered_by == ref.steered_by
    assert alone[1].steered_by[:3] == [None] * 3 and alone[1].steered_by[3] == Panel(3)


def test_retarget_from_another_thread_lands_between_steps(loaded, setup):
    strip, heads = setup
    live = LiveTarget(Panel(2))
    started, moved = threading.Event(), threading.Event()

    def on_token(e):
        started.set()
        moved.wait(timeout=10)  # the generating thread waits for the other one after its first token

    def mover():
        started.wait(timeout=10)
        live.retarget(Panel(5))
        moved.set()

    t = threading.Thread(target=mover)
    t.start()
    out = generate(loaded, strip.image, QUESTION, heads=heads, panels=strip.panels, max_new_tokens=N, target=live,
                   on_token=on_token)
    t.join()
    assert out.steered_by[0] == Panel(2) and set(out.steered_by[1:]) == {Panel(5)}
    assert live.changes == 1


def test_bad_retargets_are_refused_in_the_callers_thread(loaded, setup):
    strip, heads = setup
    inputs, _ = prepare_inputs(loaded, strip.image, QUESTION)
    live = LiveTarget(Panel(2))
    with steer(loaded.model, heads, live, inputs=inputs, panels=strip.panels):
        with pytest.raises(RegionError, match="out of range"):
            live.retarget(Panel(9))
        with pytest.raises(RegionError):
            live.retarget(Box((0, 0, 2, 2)))  # covers no image token
        assert live.target == Panel(2)
        live.retarget(3)  # a panel number
        assert live.target == Panel(3)
    with pytest.raises(RegionError, match="out of range"):
        with steer(loaded.model, heads, LiveTarget(Panel(9)), inputs=inputs, panels=strip.panels):
            pass
    with pytest.raises(GazeError, match="live target"):
        with steer(loaded.model, heads, live, inputs=inputs, panels=strip.panels, phase="prefill"):
            pass


@pytest.mark.parametrize("bad", [[(3.7, 1)], [(1, 0.5)], [(1.0, 1)], [("1", 1)], [(True, 1)], [(1,)]])
def test_non_integer_heads_are_refused_not_truncated(loaded, setup, bad):
    strip, _ = setup
    inputs, _ = prepare_inputs(loaded, strip.image, QUESTION)
    with pytest.raises(GazeError, match="head"):
        with steer(loaded.model, bad, Panel(1), inputs=inputs, panels=strip.panels):
            pass
    with pytest.raises(GazeError, match="head"):
        generate(loaded, strip.image, QUESTION, heads=bad, target=Panel(1), panels=strip.panels, max_new_tokens=1)
    with pytest.raises(GazeError, match="head"):
        generate(loaded, strip.image, QUESTION, track=bad, max_new_tokens=1)
    # whole numbers of any integer type are fine
    with steer(loaded.model, [(torch.tensor(1), 0)], Panel(1), inputs=inputs, panels=strip.panels):
        pass


# ---------------------------------------------------------------- the cached image prefix


def test_a_cached_prefix_gives_the_full_prefills_logits(loaded, setup):
    strip, _ = setup
    model = loaded.model
    for question in (QUESTION, "What is happening in the 3rd panel from the left?"):
        inputs, layout = prepare_inputs(loaded, strip.image, question)
        p = image_prefix_len(model, inputs["input_ids"], layout)
        assert p == int(layout.positions[-1]) + 2  # the image tokens and <|vision_end|>
        assert int(inputs["input_ids"][0, p - 1]) == model.config.vision_end_token_id
        with torch.no_grad():
            full = model(**inputs).logits[0, p:]
            prefix = compute_prefix(loaded, inputs, p)
            suffix = model(input_ids=inputs["input_ids"][:, p:], attention_mask=inputs["attention_mask"],
                           position_ids=full_positions(loaded, inputs)[..., p:], past_key_values=prefix.fork(),
                           use_cache=True).logits[0]
        assert torch.allclose(full, suffix, atol=1e-5), (full - suffix).abs().max()
        assert prefix.cache.get_seq_length() == p  # the fork was written to, the kept prefix was not


@pytest.mark.parametrize("how", ["unsteered", "after_image", "decode", "live"])
def test_cached_generation_equals_uncached(loaded, setup, how):
    strip, heads = setup
    cache = PrefixCache(max_entries=2)
    kw = dict(max_new_tokens=N, track=heads, panels=strip.panels)
    if how != "unsteered":
        kw.update(heads=heads, phase="all" if how == "live" else how)
        kw["target"] = Panel(3)
    if how == "live":
        kw["phase"] = "after_image"
    runs = []
    for c in (None, cache, cache):
        if how == "live":
            live = LiveTarget(Panel(3))
            kw.update(target=live, on_token=retarget_at(live, {2: Panel(6), 5: None}))
        runs.append(generate(loaded, strip.image, QUESTION, prefix_cache=c, **kw))
    plain, first, second = runs
    assert not plain.prefix_cached and first.prefix_cached and second.prefix_cached
    assert cache.misses == 1 and cache.hits == 1
    for out in (first, second):
        assert out.token_ids == plain.token_ids and out.steered_by == plain.steered_by
        assert torch.allclose(out.tracker.attention(), plain.tracker.attention(), atol=1e-3)


def test_after_image_leaves_the_image_rows_alone(loaded, setup):
    """Phase "after_image", uncached: the image prefix's rows equal the unsteered ones, the question's do not."""
    from gaze.scoring import RowRecorder

    strip, heads = setup
    inputs, layout = prepare_inputs(loaded, strip.image, QUESTION)
    p = image_prefix_len(loaded.model, inputs["input_ids"], layout)
    rows = torch.arange(inputs["input_ids"].shape[1])[None]
    base, steered = RowRecorder(rows=rows), RowRecorder(rows=rows)
    with torch.no_grad():
        from gaze.attention import active
        with active(base):
            loaded.model(**inputs)
        with steer(loaded.model, heads, Panel(2), inputs=inputs, panels=strip.panels, phase="after_image"), \
                active(steered):
            loaded.model(**inputs)
    layer, head = heads[0]
    a, b = base.records[layer][:, head], steered.records[layer][:, head]  # [rows, kv]
    assert torch.equal(a[:p], b[:p])
    assert not torch.allclose(a[p:], b[p:])


def test_steering_the_image_rows_is_not_served_from_the_cache(loaded, setup):
    strip, heads = setup
    cache = PrefixCache()
    for phase in ("all", "prefill"):
        out = generate(loaded, strip.image, QUESTION, heads=heads, target=Panel(2), panels=strip.panels,
                       phase=phase, max_new_tokens=3, prefix_cache=cache)
        assert not out.prefix_cached
    assert len(cache) == 0


def test_the_prefix_cache_is_bounded_and_keyed_by_the_image(loaded, strip_for):
    patch = loaded.family.merged_patch(loaded.processor)
    strips = [strip_for(patch, seed=s) for s in (1, 2, 3)]
    cache = PrefixCache(max_entries=2)
    for s in strips:
        generate(loaded, s.image, QUESTION, max_new_tokens=1, prefix_cache=cache)
    assert len(cache) == 2 and cache.misses == 3 and cache.hits == 0 and cache.nbytes() > 0
    generate(loaded, strips[2].image, "Which letter is on the 1st panel?", max_new_tokens=1, prefix_cache=cache)
    assert cache.hits == 1  # another question on the same image reuses its prefix
    generate(loaded, strips[0].image, QUESTION, max_new_tokens=1, prefix_cache=cache)
    assert cache.misses == 4  # the oldest image was dropped
    with pytest.raises(GazeError):
        PrefixCache(max_entries=0)
