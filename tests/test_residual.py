"""Residual-stream edits and captures on tiny models of every family: zero is nothing, only the chosen layer
moves (by exactly alpha * v where asked), positions are absolute in prefill and cached decoding, threads
are isolated, nothing remains after an exception."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from gaze.errors import GazeError
from gaze.generation import prepare_inputs
from gaze.models import load
from gaze.residual import _ACTIVE, add_direction, capture_residual, decoder_layers, hooked
from gaze.strips import Strip, stitch_panels

QUESTION = "Which letter is on the 2nd panel?"
LAYERS = 3


def tiny_strip(family: str, loaded, seed: int = 0) -> Strip:
    """Six flat panels of 2x2 tokens (LLaVA-1.5, which centre-crops a square: two rows of three)."""
    g = torch.Generator().manual_seed(seed)
    patch = loaded.family.merged_patch(loaded.processor)
    rows = 2 if family == "llava" else 1
    size = (2 * patch, 3 * patch) if family == "llava" else (2 * patch, 2 * patch)
    panels = [Image.fromarray((torch.randint(0, 200, (1, 1, 3), generator=g)
                               + torch.randint(0, 56, (size[1], size[0], 3), generator=g)).to(torch.uint8).numpy())
              for _ in range(6)]
    image, boxes = stitch_panels(panels, rows=rows)
    return Strip(image=image, panels=boxes, strip_id=f"s{seed}", letters=tuple("ABCDEF"))


@pytest.fixture(scope="module")
def base_tokenizer():
    from gaze.testing import build_tokenizer

    return build_tokenizer()


def _tiny(family, tmp_path_factory, tokenizer):
    from gaze.testing import build_tiny_vlm

    folder = build_tiny_vlm(family, tmp_path_factory.mktemp(family), tokenizer=tokenizer, num_layers=LAYERS)
    loaded = load(str(folder), device="cpu")
    inputs, _ = prepare_inputs(loaded, tiny_strip(family, loaded).image, QUESTION)
    return family, loaded, inputs


# one family per backbone and image layout kind (every family: tests/test_probe.py runs the probe on each)
EDIT_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "llava", "llava_onevision", "gemma3", "smolvlm")


@pytest.fixture(scope="module", params=EDIT_FAMILIES)
def tiny(request, tmp_path_factory, base_tokenizer):
    return _tiny(request.param, tmp_path_factory, base_tokenizer)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, base_tokenizer):
    return _tiny("qwen3_vl", tmp_path_factory, base_tokenizer)


def _logits(loaded, inputs):
    with torch.no_grad():
        return loaded.model(**inputs).logits


def _vector(loaded, seed=1, scale=3.0):
    return scale * torch.randn(loaded.model.config.get_text_config().hidden_size,
                               generator=torch.Generator().manual_seed(seed))


def _capture_all(loaded, inputs, hidden_states=False):
    with torch.no_grad(), capture_residual(loaded.model, None, positions=None) as cap:
        out = loaded.model(**inputs, output_hidden_states=hidden_states)
    return cap.activations, out


def test_zero_is_nothing_and_only_the_chosen_layer_moves_by_exactly_alpha_v(tiny):
    """Per family: alpha = 0 and a zero vector are bit-identical to no edit; an edit at layer 1 leaves layer 0
    identical, moves layer 1 by exactly alpha * v at the chosen positions (and nowhere else), and what
    follows; the capture is what `output_hidden_states` reports for the layer's output."""
    family, loaded, inputs = tiny
    base, out = _capture_all(loaded, inputs, hidden_states=True)  # [layers, n, hidden]
    n = base.shape[1]
    for l in range(LAYERS - 1):  # hidden_states[l + 1] is layer l's output (the last one is normed)
        assert torch.equal(base[l], out.hidden_states[l + 1][0])
    layer, alpha, v = 1, 0.5, _vector(loaded)
    with add_direction(loaded.model, layer, v, alpha=0.0):
        assert torch.equal(_logits(loaded, inputs), out.logits)
    with add_direction(loaded.model, layer, torch.zeros_like(v), alpha=5.0):
        assert torch.equal(_logits(loaded, inputs), out.logits)
    for positions in (-1, slice(3, 9, 2), None):
        with add_direction(loaded.model, layer, v, alpha=alpha, positions=positions) as edit:
            got, moved = _capture_all(loaded, inputs)
        assert edit.forwards == 1
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[list(range(n)) if positions is None else list(range(n))[positions]] = True
        for l in range(layer):
            assert torch.equal(got[l], base[l]), (l, positions)
        expected = base[layer].clone()
        expected[chosen] = base[layer][chosen] + (alpha * v).to(base.dtype)
        assert torch.equal(got[layer], expected), positions
        assert not torch.equal(got[layer + 1][chosen], base[layer + 1][chosen])
        assert not torch.equal(moved.logits, out.logits)
    with torch.no_grad(), capture_residual(loaded.model, [0, 1], positions=-1) as cap:
        loaded.model(**inputs)
    assert cap.activations.shape == (2, 1, base.shape[-1]) and cap.positions == [n - 1]
    assert torch.equal(cap.activations[:, 0], base[:2, -1])


def test_positions_are_absolute_in_prefill_and_in_cached_decoding(qwen3):
    """The same absolute positions are edited whether the tokens come in one full forward or one by one."""
    _, loaded, inputs = qwen3
    n = inputs["input_ids"].shape[1]
    v, layer = _vector(loaded, seed=3), 1
    with torch.no_grad():
        plain = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with add_direction(loaded.model, 0, v, alpha=0.0, positions=None):
            assert torch.equal(loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False), plain)
    # (positions in generate, the same absolute positions for one full forward, layer `layer`'s moved rows)
    cases = [([n - 1, n + 1], [n - 1, n + 1], [n - 1, n + 1]),
             (slice(-1, None), slice(n - 1, None), list(range(n - 1, n + 3))),  # last prompt token + answer
             (lambda total: total - 1, list(range(n - 1, n + 3)), list(range(n - 1, n + 3)))]  # newest token
    for positions, same, want in cases:
        with torch.no_grad(), add_direction(loaded.model, layer, v, positions=positions) as edit, \
                capture_residual(loaded.model, [0, layer, 2], positions=None) as cap:
            out = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert edit.forwards == 4 and cap.positions == list(range(n + 3))  # prefill + 3 decode steps
        full = dict(inputs, input_ids=out[:, :-1], attention_mask=torch.ones_like(out[:, :-1]))
        if "mm_token_type_ids" in inputs:
            full["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros((1, out.shape[1] - 1 - n), dtype=torch.long)], dim=1)
        with torch.no_grad(), add_direction(loaded.model, layer, v, positions=same), \
                capture_residual(loaded.model, [0, layer, 2], positions=None) as cap_full:
            loaded.model(**full)
        assert torch.allclose(cap.activations, cap_full.activations, atol=1e-5), want
        with torch.no_grad(), capture_residual(loaded.model, [layer], positions=None) as plain:
            loaded.model(**full)
        moved = (cap.activations[1] - plain.activations[0]).abs().amax(-1) > 1e-4  # [n + 3]
        assert moved.nonzero().flatten().tolist() == want


def test_two_threads_get_what_they_get_alone(qwen3):
    _, loaded, inputs = qwen3
    v = _vector(loaded, seed=7, scale=20.0)
    plain = _logits(loaded, inputs)
    with add_direction(loaded.model, 1, v):
        steered = _logits(loaded, inputs)
    assert not torch.equal(plain, steered)
    results, barrier = {}, threading.Barrier(2)

    def run(name):
        barrier.wait()
        for i in range(3):
            if name == "steered":
                with add_direction(loaded.model, 1, v):
                    results[name, i] = _logits(loaded, inputs)
            else:
                results[name, i] = _logits(loaded, inputs)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("plain", "steered")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        assert torch.equal(results["plain", i], plain)
        assert torch.equal(results["steered", i], steered)
    assert not any(hooked(m) for m in decoder_layers(loaded.model))


def test_nothing_remains_after_an_exception(qwen3):
    _, loaded, inputs = qwen3
    base = _logits(loaded, inputs)
    layers = decoder_layers(loaded.model)
    with pytest.raises(KeyError):
        with add_direction(loaded.model, 2, _vector(loaded)), capture_residual(loaded.model, None) as cap:
            assert not torch.equal(_logits(loaded, inputs), base)
            assert all(hooked(m) for m in layers)
            raise KeyError("inside")
    assert _ACTIVE.get() == ()
    assert not any(hooked(m) for m in layers)
    assert all(not m._forward_hooks for m in layers)
    assert torch.equal(_logits(loaded, inputs), base)
    assert cap.activations.shape[0] == LAYERS  # what was captured before the error stays readable


def test_nested_blocks_add_up_and_unwind(qwen3):
    _, loaded, inputs = qwen3
    v, w = _vector(loaded, 1), _vector(loaded, 2)
    base, _ = _capture_all(loaded, inputs)
    with add_direction(loaded.model, 1, v, positions=-1):
        with add_direction(loaded.model, 1, w, alpha=2.0, positions=-1):
            both, _ = _capture_all(loaded, inputs)
        one, _ = _capture_all(loaded, inputs)
    assert torch.equal(one[1, -1], base[1, -1] + v)
    assert torch.equal(both[1, -1], base[1, -1] + v + 2.0 * w)
    assert not any(hooked(m) for m in decoder_layers(loaded.model))


def test_bad_requests_are_one_line_gaze_errors(qwen3):
    _, loaded, inputs = qwen3
    v = _vector(loaded)
    bad = [dict(layer=LAYERS, vector=v), dict(layer=-1, vector=v), dict(layer=0, vector=v[:-1]),
           dict(layer=0, vector=torch.full_like(v, float("nan"))), dict(layer=0, vector=v, alpha=float("inf")),
           dict(layer=0, vector=v, positions=slice(0, None, -1)), dict(layer=0, vector=v, positions="last"),
           dict(layer=0, vector=torch.arange(v.shape[0]))]
    for kw in bad:
        with pytest.raises(GazeError) as e:
            with add_direction(loaded.model, **kw):
                pass
        assert "\n" not in str(e.value)
    with pytest.raises(GazeError, match="outside the model"):
        with capture_residual(loaded.model, [0, LAYERS]):
            pass
    with pytest.raises(GazeError, match="nothing was captured"):
        with capture_residual(loaded.model, [0]) as cap:
            pass
        cap.activations
    assert _ACTIVE.get() == () and not any(hooked(m) for m in decoder_layers(loaded.model))
