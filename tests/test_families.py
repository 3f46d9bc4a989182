"""Every supported family, on a tiny model built from its config: pixel mapping, discovery, steering, tracking.

The pixel mapping is checked against the model's own geometry, not against
a second copy of the layout code: the image is a coordinate picture (red =
x, green = y, blue = 255 marks real pixels), the vision tower's attention is
switched off (so each image token depends only on its own pixels), and the
gradient of each image token's embedding tells which processed pixels feed
it. Their colours say where in the ORIGINAL image those pixels came from,
through the processor's real resize, padding, crop and tiling and the
model's real packing (unpad, newlines, pooling, pixel shuffle).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import PlantedHead, digit_reader
import torch
from PIL import Image

from gaze.attention import active
from gaze.discovery import discover
from gaze.families import FAMILIES, UnsupportedModelError, family_of
from gaze.generation import generate, prepare_inputs
from gaze.models import load
from gaze.regions import RegionError, box_membership, panel_regions
from gaze.scoring import RowRecorder, reference_strip_matrices, strip_matrices
from gaze.steering import Panel, steer
from gaze.strips import Strip, stitch_panels

# tiny family -> the family name gaze must find for it
TINY = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "qwen3_vl_moe": "Qwen3-VL",
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision",
    "internvl": "InternVL",
    "gemma3": "Gemma 3",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
}
# image sizes for the geometry probe: wide, tall, and (OneVision) one large enough to be pooled
PROBE_SIZES = {"llava_onevision": [(100, 60), (50, 90), (200, 200)]}
ANYRES = ("llava_next", "llava_onevision")
PLANT = (1, 3)  # (layer, head) planted to look at the queried panel
QUESTION = "What is the main action happening in this comic strip? Answer briefly."


@pytest.fixture(scope="module")
def base_tokenizer():
    from gaze.testing import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory, base_tokenizer):
    """(tiny family name, folder, loaded model) of each family."""
    from gaze.testing import build_tiny_vlm

    folder = build_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param), tokenizer=base_tokenizer)
    return request.param, folder, load(str(folder), device="cpu")


def strip_of(tiny_name: str, loaded, seed: int = 0, n: int = 6) -> Strip:
    """`n` (3 or 6) flat, distinct panels: one row of 2x2-token panels, or for LLaVA-1.5 (which centre-crops
    a square out of the image) a square of 3 columns (6 panels: 2 rows)."""
    g = torch.Generator().manual_seed(seed)
    patch = loaded.family.merged_patch(loaded.processor)
    rows = 2 if (tiny_name == "llava" and n == 6) else 1
    size = (2 * patch, 6 * patch // rows) if tiny_name == "llava" else (2 * patch, 2 * patch)
    panels = []
    for _ in range(n):
        colour = torch.randint(0, 200, (1, 1, 3), generator=g)
        noise = torch.randint(0, 56, (size[1], size[0], 3), generator=g)
        panels.append(Image.fromarray((colour + noise).to(torch.uint8).numpy()))
    image, boxes = stitch_panels(panels, rows=rows)
    return Strip(image=image, panels=boxes, strip_id=f"s{seed}", captions=tuple(f"c{k}" for k in range(n)))


# --- views: pure geometry ------------------------------------------------------------------------------


def test_views_replay_processor_steps():
    from gaze.families import View, _feature_edges, resized_size

    # LLaVA-1.5 on a 300x100 image: short side to 336 (1008x336), centre crop 336: the middle third
    view = View.of((300, 100))
    view = view.resize(*resized_size(*view.size, {"shortest_edge": 336})).center_crop(336, 336)
    assert view.size == (336, 336)
    assert view.rect == pytest.approx((100.0, 0.0, 200.0, 100.0))
    cells = view.grid(24, 24)  # [576, 4]
    assert cells[0].tolist() == pytest.approx([100.0, 0.0, 100 + 100 / 24, 100 / 24])
    # pad to square: a 100x50 image sits in the middle rows of a 100x100 picture
    assert View.of((100, 50)).pad_to_square().rect == pytest.approx((0.0, -25.0, 100.0, 75.0))
    # a tile of a 2x3 tiling of the image resized to 192x128
    tile = View.of((60, 40)).resize(192, 128).window(64, 64, 64, 64)
    assert tile.rect == pytest.approx((20.0, 20.0, 40.0, 40.0))
    # features of 14 px patches on 384 px tiles: 27 per tile, the last 6 px of each tile unseen
    edges = _feature_edges(0, 54, 54, 27, 384, 14)  # [54, 2]
    assert edges[26].tolist() == [364.0, 378.0] and edges[27].tolist() == [384.0, 398.0]
    pooled = _feature_edges(0, 54, 2, 27, 384, 14)  # pooled to one cell per tile
    assert pooled.tolist() == [[0.0, 378.0], [384.0, 762.0]]


# --- geometry probe ---------------------------------------------------------------------------------------


def coordinate_image(w: int, h: int) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.round((np.arange(w) + 0.5) / w * 255)[None, :]
    a[..., 1] = np.round((np.arange(h) + 0.5) / h * 255)[:, None]
    a[..., 2] = 255
    return Image.fromarray(a)


class _Stop(Exception):
    pass


@dataclass
class Probe:
    """What the model's own geometry says about each sequence position."""

    positions: set[int]  # sequence positions whose embedding depends on the pixels
    centre: dict[int, tuple[float, float]]  # position -> mean ORIGINAL (x, y) of the real pixels feeding it


def probe(loaded, image: Image.Image) -> tuple[dict, Probe]:
    model, processor = loaded.model, loaded.processor
    enc, _ = prepare_inputs(loaded, image, "What is in the 1st panel?")
    pixels = enc["pixel_values"].float().clone().requires_grad_(True)
    enc = dict(enc, pixel_values=pixels)
    inner = model.model
    vision = next(getattr(inner, n) for n in ("visual", "vision_tower", "vision_model") if hasattr(inner, n))
    text = getattr(inner, "language_model", None) or inner.text_model
    got = {}

    def no_attention(module, args, out):  # each patch then depends on its own pixels only
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    def grab(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"][0]  # [S, D]
        raise _Stop

    hooks = [m.register_forward_hook(no_attention) for m in vision.modules()
             if type(m).__name__.endswith("Attention") and hasattr(m, "config")]
    hooks.append(text.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        model(**enc)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    embeds = got["embeds"]
    s = embeds.shape[0]
    w = torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(0))
    readout = embeds @ w  # [S]
    # two backward passes: with weights 1 and t+1 per position; where a pixel feeds exactly one
    # position t, the ratio of the two gradients is t+1
    g1, = torch.autograd.grad(readout.sum(), pixels, retain_graph=True)
    g2, = torch.autograd.grad((readout * torch.arange(1, s + 1)).sum(), pixels)

    def channels_first(t):  # [3, pixels]
        if t.dim() == 2:  # Qwen-VL: [patches, C * T * p * p]
            return t.reshape(t.shape[0], 3, -1).permute(1, 0, 2).reshape(3, -1)
        return t.movedim(-3, 0).reshape(3, -1)

    ip = processor.image_processor
    rgb = (channels_first(pixels.detach()) * torch.tensor(ip.image_std)[:, None] + torch.tensor(ip.image_mean)[:, None]) * 255
    a1, a2 = channels_first(g1).abs().sum(0), channels_first(g2).abs().sum(0)
    live = a1 > 1e-9 * a1.max()
    position = torch.full_like(a1, -1, dtype=torch.long)
    position[live] = torch.round(a2[live] / a1[live]).long() - 1
    real = live & (rgb[2] > 250)  # padding (black, or the mean colour) is not the image
    w_img, h_img = image.size
    fed = position[real]
    count = torch.bincount(fed, minlength=s).double()  # [S] real pixels per position
    sum_x = torch.bincount(fed, weights=rgb[0, real].double(), minlength=s)  # [S]
    sum_y = torch.bincount(fed, weights=rgb[1, real].double(), minlength=s)  # [S]
    centre = {p: (float(sum_x[p] / count[p]) / 255 * w_img, float(sum_y[p] / count[p]) / 255 * h_img)
              for p in count.nonzero().flatten().tolist()}
    return enc, Probe(set(position[live].unique().tolist()), centre)


def test_layout_matches_the_model_geometry(tiny):
    """Layout tokens are exactly the pixel-fed positions, each cell holds the pixels that feed it, and a box in
    the top-left corner selects exactly the tokens fed from that corner."""
    name, _, loaded = tiny
    assert loaded.family.name == TINY[name]
    image_token = loaded.family.image_token_id(loaded.model)
    for size in PROBE_SIZES.get(name, [(100, 60), (50, 90)]):
        image = coordinate_image(*size)
        enc, seen = probe(loaded, image)
        layout = loaded.family.layout(loaded.model, loaded.processor, enc, 0, image.size)
        positions = layout.positions.tolist()
        assert positions == sorted(positions)
        ids = enc["input_ids"][0]
        assert bool((ids[layout.positions] == image_token).all())
        # newlines / tile tags / <img> markers feed no pixels and are not in the layout; every image cell is
        assert set(positions) == seen.positions, name
        if name not in ANYRES:  # only anyres places image tokens (row newlines) that are not cells
            assert layout.n_tokens == int((ids == image_token).sum())
        for i, p in enumerate(positions):
            x0, y0, x1, y1 = layout.cells[i].tolist()
            if p not in seen.centre:  # fed by padding only: anyres canvas rows the unpad kept
                assert name in ANYRES, (name, p)
                continue
            cx, cy = seen.centre[p]
            # the centroid of the real pixels is the centre of the cell's part inside the image
            inside = (max(x0, 0), max(y0, 0), min(x1, size[0]), min(y1, size[1]))
            assert abs(cx - (inside[0] + inside[2]) / 2) <= 0.1 * (x1 - x0) + 0.5, (name, size, p)
            assert abs(cy - (inside[1] + inside[3]) / 2) <= 0.1 * (y1 - y0) + 0.5, (name, size, p)
        if size == (100, 60):
            box = (0, 0, 40, 30)
            member = box_membership(layout, box)
            cell_w = float((layout.cells[:, 2] - layout.cells[:, 0]).max())
            cell_h = float((layout.cells[:, 3] - layout.cells[:, 1]).max())
            for i, p in enumerate(positions):
                if p not in seen.centre:
                    continue
                cx, cy = seen.centre[p]
                if member[i]:  # selected: fed from the corner (give or take half a cell)
                    assert cx < box[2] + cell_w / 2 and cy < box[3] + cell_h / 2, (name, p)
                else:  # not selected: not fed from well inside the corner
                    assert not (cx < box[2] - cell_w / 2 and cy < box[3] - cell_h / 2), (name, p)
            assert int(member.sum()) >= 1


@pytest.mark.parametrize("tiny", ["llava"], indirect=True)
def test_llava_centre_crop_leaves_the_sides_out(tiny):
    """LLaVA-1.5 centre-crops: a wide strip's outer panels have no tokens, which is a clear error, not a wrong map."""
    _, _, loaded = tiny
    image = coordinate_image(300, 50)
    _, layout = prepare_inputs(loaded, image, QUESTION)
    assert float(layout.cells[:, 0].min()) >= 300 / 2 - 50 / 2 - 1  # the crop is the central 50x50
    with pytest.raises(RegionError, match="covers no image-token centre"):
        box_membership(layout, (0, 0, 50, 50))


# --- discovery, steering, tracking ---------------------------------------------------------------------


def test_discovery_shared_prefix_and_planted_head(tiny, tmp_path):
    name, folder, loaded = tiny
    small = strip_of(name, loaded, seed=2, n=3)  # three questions keep the full-prefill paths cheap
    shared = strip_matrices(loaded.model, loaded.processor, small)
    full = strip_matrices(loaded.model, loaded.processor, small, share_prefix=False)
    eager = load(str(folder), device="cpu", attn_implementation="eager")
    ref = reference_strip_matrices(eager.model, eager.processor, small)
    assert shared.shape == (loaded.n_layers, loaded.n_heads, 3, 3)
    assert (shared - full).abs().max() <= 1e-5, name
    assert (shared - ref).abs().max() <= 1e-5, name
    assert float(shared.sum(-1).max()) <= 1 + 1e-5

    strip = strip_of(name, loaded, seed=1)
    _, layout = prepare_inputs(loaded, strip.image, "x")
    regions = panel_regions(layout, strip.panels)
    plant = PlantedHead(*PLANT, [layout.positions[regions.token_indices(k)].tolist() for k in range(6)],
                        digit_reader(loaded.processor.tokenizer))
    with active(plant):
        ranking = discover(loaded, [strip], tmp_path / "run", progress=False)
    assert ranking.top(1) == [PLANT], name
    assert float(torch.diagonal(ranking.matrices[PLANT]).mean()) > 0.5


def test_steering_moves_only_the_chosen_heads_onto_the_target(tiny):
    name, _, loaded = tiny
    strip = strip_of(name, loaded, seed=5)
    inputs, layout = prepare_inputs(loaded, strip.image, QUESTION)
    n = inputs["input_ids"].shape[1]
    last = loaded.n_layers - 1
    chosen = [(last, 1), (last, 2)]  # the last layer: earlier heads would change every later one
    with torch.no_grad():
        base = loaded.model(**inputs).logits
        with steer(loaded.model, chosen, Panel(3), layout=layout, prompt_len=n, panels=strip.panels, strength=0.0):
            assert torch.equal(loaded.model(**inputs).logits, base)  # strength 0 is exactly unsteered
        before, after = RowRecorder(), RowRecorder()
        with active(before):
            loaded.model(**inputs)
        with steer(loaded.model, chosen, Panel(4), layout=layout, prompt_len=n, panels=strip.panels), active(after):
            loaded.model(**inputs)
    regions = panel_regions(layout, strip.panels)
    target = layout.positions[regions.token_indices(3)]
    for layer in range(loaded.n_layers):
        for head in range(loaded.n_heads):
            same = torch.equal(before.records[layer][:, head], after.records[layer][:, head])
            assert same == ((layer, head) not in chosen), (name, layer, head)
    for layer, head in chosen:
        row = after.records[layer][0, head]
        assert float(row[target].sum() / row[layout.positions].sum()) > 0.99, name


def test_tracking_shapes(tiny):
    name, _, loaded = tiny
    strip = strip_of(name, loaded, seed=7)
    heads = [(0, 1), (1, 2)]
    out = generate(loaded, strip.image, QUESTION, heads=heads, target=2, panels=strip.panels, max_new_tokens=3,
                   track=True)
    att = out.tracker.attention()
    assert att.shape[1:] == (2, out.layout.n_tokens)
    assert att.shape[0] >= len(out.token_ids)
    regions = panel_regions(out.layout, strip.panels)
    traj = out.trajectory(regions)
    assert traj.shape == (len(out.token_ids), 6)
    assert bool((traj.argmax(-1) == 1).all())  # steered to panel 2, the tracked heads look there
    if out.layout.grid is not None:
        assert out.tracker.heatmap(0).shape == out.layout.grid
    else:
        with pytest.raises(ValueError, match="do not form one grid"):
            out.tracker.heatmap(0)


# --- family quirks and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_gemma3_image_tokens_attend_both_ways(tiny):
    """Gemma 3's bidirectional image mask reaches gaze_sdpa: dropping token_type_ids changes the logits."""
    name, folder, loaded = tiny
    strip = strip_of(name, loaded)
    inputs, _ = prepare_inputs(loaded, strip.image, QUESTION)
    plain = load(str(folder), device="cpu")  # loaded fresh: compare with stock SDPA on the text model
    plain.model.set_attn_implementation({"text_config": "sdpa"})
    with torch.no_grad():
        ours = loaded.model(**inputs).logits
        stock = plain.model(**inputs).logits
        causal = loaded.model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, causal, atol=1e-4)


def test_unknown_family_names_the_supported_ones(tmp_path):
    from transformers import VipLlavaConfig

    VipLlavaConfig().save_pretrained(tmp_path / "vipllava")
    with pytest.raises(UnsupportedModelError, match="not supported yet") as err:
        load(str(tmp_path / "vipllava"))
    for family in FAMILIES:
        assert family.name in str(err.value)
        for model_type in family.model_types:
            assert model_type in str(err.value)
    with pytest.raises(UnsupportedModelError, match="-hf"):
        family_of(SimpleNamespace(model_type="internvl_chat", vision_config=object()))


def test_gemma3_soft_capping_is_refused():
    from transformers import Gemma3Config

    config = Gemma3Config(text_config={"attn_logit_softcapping": 50.0, "num_hidden_layers": 1})
    with pytest.raises(UnsupportedModelError, match="soft-capping"):
        family_of(config)
