"""Gaze scores: how much each head looks at the panel a question is about.

For a strip of R panels and the question "What is happening in the k-th panel
from the left?" (k = 1..R), read every head's post-softmax attention from the
LAST prompt token and sum it over each panel's image tokens. Per strip that
gives a [layers, heads, R queried, R attended] tensor; the gaze score of a head
is the mean of its diagonal, averaged over strips.

Raw mass, not renormalised over the image, so a head that ignores the image
scores ~0 whatever its spatial pattern.

Cost: the R prompts share everything up to the end of the image tokens. We
prefill that prefix ONCE and run the R question suffixes as one sequence on
its KV cache (a block mask keeps each suffix to the prefix and itself; no
cache copies, one pass over the weights), reading only the last query row of
each question for each head (`attention.attention_rows`). Both passes end in
the last layer's attention (`StopAfter`): its output, MLP and the logits are
never computed. `strip_matrices(..., share_prefix=False)`
runs R full prefills instead; both give the same numbers (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from gaze.attention import Hook, StopForward, active, prepare
from gaze.errors import GazeError
from gaze.families import Family, family_of
from gaze.prompts import PANEL_QUESTION, chat_text, panel_question
from gaze.regions import ImageLayout, RegionMap, panel_regions, region_mass
from gaze.strips import Strip


@dataclass
class RowRecorder(Hook):
    """Records the attention rows of chosen query positions, for chosen layers, in one forward."""

    layers: set[int] | None = None  # None: every layer
    rows: torch.Tensor | None = None  # [B] or [B, R] query indices; None: the last query of each row
    records: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, kv]
    keep_value_norms: bool = False
    value_norms: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, kv] ||v_j|| per head

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def query_rows(self, query_len: int) -> torch.Tensor | None:
        return self.rows

    def record(self, layer: int, rows: torch.Tensor, value: torch.Tensor) -> None:
        self.records[layer] = rows
        if self.keep_value_norms:
            norms = value.float().norm(dim=-1)  # [B, Hkv, kv]
            norms = norms.repeat_interleave(rows.shape[1] // norms.shape[1], dim=1)  # [B, H, kv]
            self.value_norms[layer] = norms.repeat_interleave(rows.shape[0] // norms.shape[0], dim=0)  # [B*R, H, kv]

    def stacked(self, values: bool = False) -> torch.Tensor:
        """[L, B, H, kv] in layer order (value norms with `values=True`)."""
        source = self.value_norms if values else self.records
        return torch.stack([source[k] for k in sorted(source)])


@dataclass
class StopAfter(Hook):
    """Ends a forward in the attention of `layer` (the last layer whose rows are needed)."""

    layer: int

    def stops_at(self, layer: int) -> bool:
        return layer == self.layer


def _until(hook: StopAfter, run) -> None:
    """Run `run()` with the forward ended early at `hook.layer`."""
    try:
        with active(hook):
            run()
    except StopForward as stop:
        if stop.args[0] != hook.layer:
            raise
    else:
        raise RuntimeError(f"the forward never reached layer {hook.layer}'s attention")


def gaze_scores(matrices: torch.Tensor) -> torch.Tensor:
    """[..., R, R] (queried x attended) -> [...]: mean of the diagonal."""
    return torch.diagonal(matrices, dim1=-2, dim2=-1).mean(-1)


def _move(inputs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _floating(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


@dataclass(frozen=True)
class EncodedQueries:
    """One image and R questions, tokenised separately (no padding)."""

    inputs: list[dict]  # per question: processor output, batch of 1
    layout: ImageLayout  # image tokens of the (shared) image
    prefix_len: int  # tokens shared by every question (covers all image tokens)


def encode_queries(model, processor, image, questions: list[str], family: Family | None = None) -> EncodedQueries:
    """Tokenise each question with the image and check that the image prefix is shared."""
    family = family or family_of(model)
    device, dtype = model.device, model.dtype
    inputs = []
    for q in questions:
        enc = dict(processor(text=[chat_text(processor, q)], images=[image], return_tensors="pt"))
        inputs.append(_floating(_move(enc, device), dtype))
    layout = family.layout(model, processor, inputs[0], 0, image.size)
    ids = [x["input_ids"][0] for x in inputs]
    n = min(len(i) for i in ids)
    same = torch.stack([i[:n] for i in ids]).eq(ids[0][:n]).all(0)
    prefix_len = int(same.long().cumprod(0).sum())
    if prefix_len <= int(layout.positions[-1]):
        raise GazeError("the questions do not share the image prefix: put the image before the question")
    # Every prompt needs at least one own token after the shared prefix.
    prefix_len = min(prefix_len, n - 1)
    return EncodedQueries(inputs, layout, prefix_len)


@torch.no_grad()
def query_rows(
    model, processor, image, questions: list[str], *, share_prefix: bool = True, layers: set[int] | None = None,
    family: Family | None = None, value_norms: bool = False,
) -> tuple[torch.Tensor, ImageLayout] | tuple[torch.Tensor, torch.Tensor, ImageLayout]:
    """Attention rows of each question's last prompt token: ([L, Q, H, kv_image_prefix], layout).

    Only the first `prefix_len` keys are kept (they hold the image), so rows of
    questions of different lengths stack. With `value_norms=True` also returns
    the norm of every key's value vector per head, same shape, before the layout.
    """
    family = family or family_of(model)
    prepare(model)
    enc = encode_queries(model, processor, image, questions, family)
    p = enc.prefix_len
    if not share_prefix:
        out, norms = [], []
        for x in enc.inputs:
            rec = RowRecorder(layers, keep_value_norms=value_norms)
            with active(rec):
                model(**x, use_cache=False, logits_to_keep=1)
            out.append(rec.stacked()[:, 0, :, :p])  # [L, H, p]
            if value_norms:
                norms.append(rec.stacked(values=True)[:, 0, :, :p])
        if value_norms:
            return torch.stack(out, dim=1), torch.stack(norms, dim=1), enc.layout
        return torch.stack(out, dim=1), enc.layout  # [L, Q, H, p]

    first = enc.inputs[0]
    positions = [family.position_ids(model, x) for x in enc.inputs]  # each [3, 1, S] or None
    # per-token inputs (ids, mask, any family's token types) are cut to the prefix; image inputs stay whole
    per_token = {k for k in first if k in ("input_ids", "attention_mask") or k.endswith("token_type_ids")}
    prefix = {k: (v[:, :p] if k in per_token else v) for k, v in first.items()}
    if positions[0] is not None:
        prefix["position_ids"] = positions[0][..., :p]
    # Both passes end in the attention of the last layer read: its keys and values are cached by then,
    # and nothing after its attention rows (its output and MLP, later layers, logits) is needed.
    n_layers = int(model.config.get_text_config().num_hidden_layers)
    stop = StopAfter(max(layers) if layers else n_layers - 1)
    cache = DynamicCache(config=model.config.get_text_config())
    _until(stop, lambda: model(**prefix, past_key_values=cache, use_cache=True, logits_to_keep=1))

    # All question suffixes run as ONE sequence after the prefix cache (one pass over the weights,
    # no cache copies), each suffix kept to the prefix and itself by `SuffixBlocks`, each with the
    # positions it has in its own full prompt.
    lengths = [int(x["input_ids"].shape[1]) - p for x in enc.inputs]
    ids = torch.cat([x["input_ids"][:, p:] for x in enc.inputs], dim=1)  # [1, sum(lengths)]
    if positions[0] is not None:
        pos = torch.cat([ps[..., p:] for ps in positions], dim=-1)  # [3, 1, sum(lengths)]
    else:
        pos = torch.cat([torch.arange(p, p + n, device=model.device) for n in lengths])[None]  # [1, sum(lengths)]
    mask = torch.ones((1, p + ids.shape[1]), dtype=torch.long, device=model.device)
    ends = torch.tensor(lengths, device=model.device).cumsum(0) - 1
    rec = RowRecorder(layers, rows=ends[None], keep_value_norms=value_norms)  # [1, Q] rows -> Q records
    with active(SuffixBlocks(lengths), rec):
        _until(stop, lambda: model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                   use_cache=True, logits_to_keep=1))
    if value_norms:
        return rec.stacked()[..., :p], rec.stacked(values=True)[..., :p], enc.layout
    return rec.stacked()[..., :p], enc.layout  # [L, Q, H, p]


@dataclass
class SuffixBlocks(Hook):
    """Several suffixes in one sequence after a shared prefix: each attends to the prefix and to itself."""

    lengths: list[int]
    _cache: dict = field(default_factory=dict)

    def bias(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        q, kv = query.shape[2], key.shape[2]
        if q != sum(self.lengths):
            return None
        k = (q, kv, query.device, query.dtype)
        if k not in self._cache:
            seg = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths))  # [q]
            key_seg = torch.cat([torch.full((kv - q,), -1), seg])  # [kv]: -1 = the shared prefix
            allowed = (key_seg[None, :] == -1) | (key_seg[None, :] == seg[:, None])  # [q, kv]
            blocks = torch.zeros((q, kv), dtype=query.dtype).masked_fill(~allowed, float("-inf"))
            self._cache[k] = blocks[None, None].to(query.device)  # [1, 1, q, kv]
        return self._cache[k]


VARIANTS: dict[str, str] = {
    "raw": "mass on the queried panel (the paper's score): image-blind heads score ~0",
    "selectivity": "queried-panel mass over the head's total panel mass: precise heads that look at the image little rank high",
    "value_weighted": "attention times the value vector's norm: attention on tokens whose values are ~0 moves nothing",
    "sink_excluded": "raw mass without sink tokens (those drawing attention whatever the query): corner-token heads drop",
}
SINK_RATIO = 3.0  # a sink gets >= this many times the mean image token's attention, even from its least interested query


def sink_tokens(image_rows: torch.Tensor, ratio: float = SINK_RATIO) -> torch.Tensor:
    """[..., Q, T] attention over image tokens -> [..., T] bool: tokens that draw attention whatever the query."""
    floor = image_rows.min(dim=-2).values  # [..., T]: attention from the least interested query
    mean = image_rows.mean(dim=(-2, -1), keepdim=False)[..., None]  # [..., 1]
    return floor >= ratio * mean.clamp_min(1e-12)


def variant_matrices(rows: torch.Tensor, norms: torch.Tensor | None, layout: ImageLayout, regions: RegionMap) -> dict[str, torch.Tensor]:
    """All score variants' [L, H, Q, R] matrices from one pass's rows [L, Q, H, kv] (and value norms)."""
    image = rows[..., layout.positions].float().permute(0, 2, 1, 3)  # [L, H, Q, T]
    raw = region_mass(image, regions)  # [L, H, Q, R]
    out = {"raw": raw, "selectivity": raw / raw.sum(-1, keepdim=True).clamp_min(1e-12)}
    if norms is not None:
        weighted = image * norms[..., layout.positions].float().permute(0, 2, 1, 3)
        out["value_weighted"] = region_mass(weighted, regions)
    keep = (~sink_tokens(image)).to(image.dtype)[..., None, :]  # [L, H, 1, T]
    out["sink_excluded"] = region_mass(image * keep, regions)
    return {k: v.cpu() for k, v in out.items()}


def strip_variants(
    model, processor, strip: Strip, *, template: str = PANEL_QUESTION, share_prefix: bool = True,
    family: Family | None = None,
) -> dict[str, torch.Tensor]:
    """Every score variant's [layers, heads, R queried, R attended] matrix for one strip, from ONE pass."""
    questions = [panel_question(k + 1, template) for k in range(strip.n_panels)]
    rows, norms, layout = query_rows(model, processor, strip.image, questions, share_prefix=share_prefix,
                                     family=family, value_norms=True)
    return variant_matrices(rows, norms, layout, panel_regions(layout, strip.panels))


def strip_matrices(
    model, processor, strip: Strip, *, template: str = PANEL_QUESTION, share_prefix: bool = True,
    family: Family | None = None,
) -> torch.Tensor:
    """[layers, heads, R queried, R attended] raw attention mass of one strip (float32, CPU)."""
    questions = [panel_question(k + 1, template) for k in range(strip.n_panels)]
    rows, layout = query_rows(model, processor, strip.image, questions, share_prefix=share_prefix, family=family)
    regions = panel_regions(layout, strip.panels)
    mass = region_mass(rows.float(), regions, layout)  # [L, Q, H, R]
    return mass.permute(0, 2, 1, 3).cpu()  # [L, H, Q, R]


@torch.no_grad()
def reference_strip_matrices(
    eager_model, processor, strip: Strip, *, template: str = PANEL_QUESTION, family: Family | None = None
) -> torch.Tensor:
    """The reference formulation: R full prefills with eager attention and `output_attentions=True`.

    `eager_model` must be loaded with `attn_implementation="eager"`. Used by the
    tests and the benchmark as ground truth; slow and memory-hungry by design.
    """
    family = family or family_of(eager_model)
    out = []
    layout: ImageLayout | None = None
    regions: RegionMap | None = None
    for k in range(strip.n_panels):
        enc = dict(processor(text=[chat_text(processor, panel_question(k + 1, template))], images=[strip.image], return_tensors="pt"))
        enc = _floating(_move(enc, eager_model.device), eager_model.dtype)
        if layout is None:
            layout = family.layout(eager_model, processor, enc, 0, strip.image.size)
            regions = panel_regions(layout, strip.panels)
        attentions = eager_model(**enc, output_attentions=True, use_cache=False).attentions  # L x [1, H, S, S]
        rows = torch.stack([a[0, :, -1, :] for a in attentions]).float()  # [L, H, S]
        out.append(region_mass(rows, regions, layout))  # [L, H, R]
    return torch.stack(out, dim=2).cpu()  # [L, H, Q, R]
