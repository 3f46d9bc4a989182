"""Attention capture and additive biases on the fused SDPA path.

`prepare(model)` registers one attention implementation, "gaze_sdpa", with
transformers' `AttentionInterface` (and the SDPA mask builder with its
`AttentionMaskInterface`, without which padding would be silently ignored) and
switches the language backbone to it; the vision tower keeps plain SDPA.
With no hook active, "gaze_sdpa" IS `sdpa_attention_forward`: same kernel,
same numbers, same weights. That switch and one forward pre-hook on the input
embedding (below) are the only marks `prepare` leaves on a model; it is
idempotent, and `restore(model)` takes both away.

Work is done by hooks, active only inside `active(*hooks)`:

- a hook's `bias(layer, query, key)` returns an additive pre-softmax bias
  [B|1, H, q|1, kv] (or None); biases of all hooks are summed and handed to
  SDPA as its float mask (`position_bias`), so steering never leaves the fused
  kernel path;
- when a hook asks for every row (`query_rows` gives `ALL_ROWS`, as training's
  penalties do), the layer runs eagerly instead: the pre-softmax scores once,
  softmax(scores + mask + bias) once, its product with the values as the
  output and the same matrices handed to `record` (differentiable), where the
  fused kernel plus a recomputation would compute the scores twice, or three
  times for a bias built from them (`Hook.scores_and_bias`). The output equals
  SDPA's to float rounding; `whole_matrix_path("sdpa")` keeps the fused kernel
  (the two are compared in `benchmarks/bench_training_step.py`);
- a hook's `wants(layer)` asks for the post-softmax attention rows of chosen
  query positions (default: the last one), recomputed at O(heads x kv x dim)
  as softmax(q . K^T * scale + mask + bias), which equals eager
  `output_attentions` rows; `record(layer, rows, value)` receives them
  [B, H, kv] (with the layer's values, for value-weighted scores);
- `on_forward(input_ids)` is called at every model forward (prefill, each
  decode step) with the token ids being fed, from a pre-hook on the input
  embedding, so a hook can count decode steps and see generated tokens.

Hooks live in a `ContextVar`: they belong to the thread (or task) that
entered `active`, so two threads generating at once never see each other's
hooks, and leaving the block (even by an exception) removes them.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator
from weakref import WeakKeyDictionary

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "gaze_sdpa"
ALL_ROWS = "all"  # `Hook.query_rows` value asking for every query row: `record` then gets [B, H, q, kv]


class StopForward(Exception):
    """Raised in the attention of a layer at which a hook `stops_at`: the rest of the forward is not needed.

    By then the layer's keys and values are in the cache and its rows are
    recorded; its attention output, MLP, the later layers and the logits are skipped.
    """


class Hook:
    """A do-nothing hook to subclass: override what you need."""

    def on_forward(self, input_ids: torch.Tensor) -> None:
        pass

    def bias(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        return None

    def scores_and_bias(self, layer: int, query: torch.Tensor, key: torch.Tensor,
                        scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """On the whole-matrix path, where the layer's pre-softmax scores [B, H, q, kv] (`attention_scores`)
        are at hand: (the scores to go on with, an additive bias). By default the scores as they are and
        `bias`; a hook whose bias is built from the scores (to cancel or replace them) overrides this to
        edit them directly, and its `bias` computes them itself for the fused path."""
        return scores, self.bias(layer, query, key)

    def wants(self, layer: int) -> bool:
        return False

    def query_rows(self, query_len: int) -> torch.Tensor | None:
        """[B] query indices whose rows `record` receives; None = the last query of every row."""
        return None

    def record(self, layer: int, rows: torch.Tensor, value: torch.Tensor) -> None:
        """rows [B, H, kv] float32 post-softmax; value [B, Hkv, kv, D] (for value-weighted variants)."""

    def stops_at(self, layer: int) -> bool:
        """True: end the forward (`StopForward`) in this layer's attention, after recording its rows."""
        return False


_ACTIVE: ContextVar[tuple[Hook, ...]] = ContextVar("gaze_attention_hooks", default=())
_WHOLE_PATH: ContextVar[str] = ContextVar("gaze_whole_matrix_path", default="eager")


@contextlib.contextmanager
def whole_matrix_path(path: str) -> Iterator[None]:
    """How a layer whose hooks want every row runs, for the calling thread/task, inside the block: "eager"
    (the default: scores and softmax once, shared by the output and the hooks) or "sdpa" (the fused kernel
    for the output, the matrices recomputed for the hooks: what this module did before the eager path)."""
    if path not in ("eager", "sdpa"):
        raise ValueError(f"whole_matrix_path is 'eager' or 'sdpa', not {path!r}")
    token = _WHOLE_PATH.set(path)
    try:
        yield
    finally:
        _WHOLE_PATH.reset(token)


@contextlib.contextmanager
def active(*hooks: Hook) -> Iterator[None]:
    """Activate hooks for the calling thread/task only, for the duration of the block."""
    token = _ACTIVE.set(_ACTIVE.get() + tuple(hooks))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _masked_softmax(scores: torch.Tensor, rows: torch.Tensor, q: int, mask: torch.Tensor | None,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(scores + mask + bias) over keys, with the mask logic of `sdpa_attention_forward`: the one
    place both recomputations (chosen rows, whole matrices) apply it.

    scores [..., kv]; rows: each score row's query index, broadcastable to scores[..., 0] (for the causal
    path); mask None (causal), bool (True = attend) or float additive, broadcastable to scores; bias too.
    """
    kv = scores.shape[-1]
    if mask is None:
        # SDPA's causal path: lower-right aligned, except the static-cache prefill
        # where keys beyond q are cropped (upper-left).
        limit = rows if (q > 1 and kv > q) else rows + (kv - q)
        scores = scores.masked_fill(torch.arange(kv, device=scores.device) > limit[..., None], float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    if bias is not None:
        scores = scores + bias.float()
    # a row with every key masked (a left-padded prompt's pad rows) softmaxes to NaN; SDPA gives it zeros, and
    # so does this: on the whole-matrix path its NaN values would reach every real row of the next layer
    # through 0 x NaN, and in recomputed rows or matrices they would poison sums over rows (penalties)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def _flat_rows(rows: torch.Tensor | None, b: int, q: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`Hook.query_rows`' answer ([B], [B, R] or None = the last) as (batch index, row index), both [B * R],
    batch-major."""
    if rows is None:
        rows = torch.full((b,), q - 1, dtype=torch.long, device=device)
    rows = rows.to(device)
    if rows.ndim == 1:
        rows = rows[:, None]
    return torch.arange(b, device=device).repeat_interleave(rows.shape[1]), rows.flatten()


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scaling: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Post-softmax attention of chosen query rows, recomputed: [B, H, kv] float32.

    query [B, H, q, D], key [B, Hkv, kv, D] (GQA: H a multiple of Hkv);
    attention_mask: None (causal), bool (True = attend) or float additive,
    shaped [B|1, 1|H, q, kv]; bias [B|1, H|1, q|1, kv] or None; rows [B] query
    indices (default: last), or [B, R] for R rows per batch element, which
    gives [B * R, H, kv] (batch-major). Mirrors the mask logic of
    `sdpa_attention_forward`.
    """
    b, h, q, d = query.shape
    hkv, kv = key.shape[1], key.shape[2]
    batch, rows = _flat_rows(rows, b, q, query.device)
    n = rows.numel()
    q_sel = query[batch, :, rows].float()  # [N, H, D]
    k = key.float()[batch if key.shape[0] > 1 else torch.zeros_like(batch)]  # [N, Hkv, kv, D]
    scores = torch.einsum("ngrd,ngkd->ngrk", q_sel.view(n, hkv, h // hkv, d), k)  # [N, Hkv, rep, kv]
    scores = scores.reshape(n, h, kv) * scaling  # [N, H, kv]
    m = None
    if attention_mask is not None:
        m = attention_mask[batch if attention_mask.shape[0] > 1 else torch.zeros_like(batch), :, rows]  # [N, 1|H, kv]
    if bias is not None:
        bb = batch if bias.shape[0] > 1 else torch.zeros_like(batch)
        br = rows if bias.shape[2] > 1 else torch.zeros_like(rows)
        bias = bias[bb, :, br]  # [N, H|1, kv]
    return _masked_softmax(scores, rows[:, None], q, m, bias)


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Post-softmax attention of every query row: [B, H, q, kv] float32 (differentiable), with the mask
    logic of `attention_rows`: what eager attention returns, for hooks that need whole matrices."""
    q, kv = query.shape[2], key.shape[2]
    scores = attention_scores(query, key, scaling)
    m = None if attention_mask is None else attention_mask[..., :q, :kv]
    return _masked_softmax(scores, torch.arange(q, device=query.device), q, m, bias)


def attention_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Pre-softmax scores of every query row, no mask: [B, H, q, kv] float32 (differentiable). query
    [B, H, q, D], key [B, Hkv, kv, D] (GQA: query head i reads key head i // (H / Hkv))."""
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # [B, H, kv, D]
    return torch.matmul(query.float(), k.transpose(-1, -2)) * scaling


def gaze_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`sdpa_attention_forward` plus the active hooks' biases and row recording."""
    hooks = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if not hooks or layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    stop = any(hook.stops_at(layer) for hook in hooks)
    wanting = [hook for hook in hooks if hook.wants(layer)]
    if (not stop and _WHOLE_PATH.get() == "eager" and (dropout == 0.0 or not module.training)
            and any(isinstance(hook.query_rows(query.shape[2]), str) for hook in wanting)):
        return _whole_matrix_attention(layer, hooks, wanting, query, key, value, attention_mask, scaling)
    bias = None
    for hook in hooks:
        b = hook.bias(layer, query, key)
        if b is not None:
            bias = b if bias is None else bias + b
    if bias is not None:
        bias = bias.to(query.dtype)
    out = None
    if not stop:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, position_bias=bias, **kwargs
        )
    if wanting:
        by_rows: dict[int, torch.Tensor] = {}
        for hook in wanting:
            rows = hook.query_rows(query.shape[2])
            cache_key = -1 if rows is None else (-2 if isinstance(rows, str) else id(rows))
            if cache_key == -2 and cache_key not in by_rows:
                by_rows[cache_key] = attention_weights(query, key, attention_mask, bias, scaling)
            elif cache_key not in by_rows:
                by_rows[cache_key] = attention_rows(query, key, attention_mask, bias, scaling, rows)
            hook.record(layer, by_rows[cache_key], value)
    if stop:
        raise StopForward(layer)
    return out, None


def _whole_matrix_attention(layer: int, hooks, wanting, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float) -> tuple[torch.Tensor, None]:
    """One layer's attention, eagerly, for hooks that want every row: the scores once, as the hooks edit
    them and with their biases (`Hook.scores_and_bias`), softmax(scores + mask + bias) once (`attention_weights`' mask logic), then its
    product with the values, shaped as `sdpa_attention_forward` returns it ([B, q, H, D])."""
    q, kv = query.shape[2], key.shape[2]
    scores = attention_scores(query, key, scaling)
    bias = None
    for hook in hooks:
        scores, b = hook.scores_and_bias(layer, query, key, scores)
        if b is not None:
            bias = b if bias is None else bias + b
    if bias is not None:
        bias = bias.to(query.dtype)
    m = None if attention_mask is None else attention_mask[..., :q, :kv]
    weights = _masked_softmax(scores, torch.arange(q, device=query.device), q, m, bias)  # [B, H, q, kv] float32
    v = value.float().repeat_interleave(query.shape[1] // value.shape[1], dim=1)  # [B, H, kv, D]
    out = torch.matmul(weights, v).to(query.dtype).transpose(1, 2).contiguous()
    for hook in wanting:
        rows = hook.query_rows(q)
        if isinstance(rows, str):
            hook.record(layer, weights, value)
        else:  # the rows of the matrix the output was made from (as the hooks edited its scores)
            batch, rows = _flat_rows(rows, query.shape[0], q, query.device)
            hook.record(layer, weights[batch, :, rows], value)
    return out, None


def _on_embedding(module: torch.nn.Module, args: tuple) -> None:
    hooks = _ACTIVE.get()
    if hooks and args and isinstance(args[0], torch.Tensor):
        for hook in hooks:
            hook.on_forward(args[0])


def register() -> None:
    """Register "gaze_sdpa" with transformers (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, gaze_sdpa_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


_PREPARED: WeakKeyDictionary = WeakKeyDictionary()  # model -> (embedding hook handle, previous implementation)


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Switch the language backbone of `model` to "gaze_sdpa" and hook its input embedding (idempotent).

    The two marks it leaves: the text model's `config._attn_implementation` is
    "gaze_sdpa" (identical numbers to SDPA while no hook is active), and one
    forward pre-hook on `model.get_input_embeddings()` (it only calls the
    active hooks' `on_forward`). Nothing is stored on the model; `restore`
    undoes both. Called by `gaze.models.load` and by `steer`.
    """
    register()
    if model in _PREPARED:
        return model
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": IMPLEMENTATION})
    handle = model.get_input_embeddings().register_forward_pre_hook(_on_embedding)
    _PREPARED[model] = (handle, previous)
    return model


def is_prepared(model: torch.nn.Module) -> bool:
    return model in _PREPARED


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `prepare`: the backbone's previous attention implementation back, the embedding hook removed."""
    entry = _PREPARED.pop(model, None)
    if entry is not None:
        handle, previous = entry
        handle.remove()
        model.set_attn_implementation({"text_config": previous or "sdpa"})
    return model
