"""The residual stream of the language backbone: add a direction to it, or read it, inside a `with` block.

    with add_direction(model, 22, vector, alpha=1.0, positions=-1):      # the last prompt token
        model.generate(**inputs)
    with capture_residual(model, [20, 22], positions=-1) as cap:
        model(**inputs)
    cap.activations                                                    # [layers, positions, hidden]

Both act on the OUTPUT of decoder layer `layer` of the language backbone (the
residual stream after that layer's attention and MLP, what the next layer
reads; `hidden_states[layer + 1]` of `output_hidden_states`). The decoder
layers are found for any supported family (`decoder_layers`); the vision tower
is never touched.

Positions are ABSOLUTE positions in the whole sequence (prompt + generated
tokens), so they mean the same in a full forward and in decoding with a KV
cache, where each forward feeds one new token:

    None           every position of every forward (prefill and each decode step)
    int p >= 0     position p (a prompt token, or the decode step that feeds position p)
    int p < 0      counted from the end of the PROMPT: -1 is the last prompt token (the one
                   whose logits pick the answer's first token); decode steps are never negative
    slice          absolute positions start:stop:step; negative bounds count from the end of the
                   prompt, stop None is open (slice(-1, None): the last prompt token and every
                   generated token)
    list of ints   those positions (negatives as for an int)
    callable       f(n) -> an int, ints or a slice of absolute positions, called at each forward with
                   n, the length of the sequence so far (past + this forward's tokens); negatives count
                   back from n (lambda n: n - 1, or -1: the newest token of every forward)

"The prompt" is the sequence up to the end of the latest forward that fed more than one token or
started at position 0 (a prefill); a forward's offset is read from the KV cache (0 without one).

Guarantees (as `gaze.steer`): the edits live in a `ContextVar`, so they belong to the thread (or
task) that entered the block and another thread running the same model meanwhile is untouched; the
one forward hook per used layer is removed when the last block using it exits, even on an
exception; `alpha = 0` (or a zero vector) is bit-identical to no intervention (the hook returns the
layer's output untouched). Captures record the output after this thread's edits, i.e. the residual
stream the next layer reads.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union
from weakref import WeakKeyDictionary

import torch

from gaze.errors import GazeError

Positions = Union[None, int, slice, Sequence[int], Callable[[int], object]]


class ResidualError(GazeError):
    """A residual-stream request that cannot be applied (bad layer, vector or positions)."""


def text_config(model):
    return model.config.get_text_config()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of the language backbone of `model`, for any supported family.

    Every family's text model (Qwen-VL's text model, the Llama / Qwen2 / Gemma 3 backbones of the others)
    is `model.get_decoder()` and holds them as `.layers`; failing that, the one `ModuleList` of
    `num_hidden_layers` blocks with a `self_attn` outside the vision tower.
    """
    n = int(text_config(model).num_hidden_layers)
    try:
        layers = getattr(model.get_decoder(), "layers", None)
    except (AttributeError, NotImplementedError, ValueError):
        layers = None
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == n:
        return layers
    found = [m for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n and "vision" not in name and "visual" not in name
             and all(hasattr(b, "self_attn") for b in m)]
    if len(found) != 1:
        raise ResidualError(f"cannot find the {n} decoder layers of this {type(model).__name__}: "
                            "see docs/families.md to add its family")
    return found[0]


def check_layer(model, layer: int) -> int:
    n = int(text_config(model).num_hidden_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ResidualError(f"layer {layer!r} is outside the model: decoder layers are 0..{n - 1}")
    return layer


def _as_int(value, what: str) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ResidualError(f"bad position {value!r} in {what}: give ints")


def check_positions(positions: Positions) -> Positions:
    """Refuse what `resolve` cannot read, at the start of the block (callables are checked when called)."""
    if positions is None or callable(positions):
        return positions
    if isinstance(positions, bool):
        raise ResidualError("positions is a bool: give None (all), an int, a slice, a list of ints or a callable")
    if isinstance(positions, int):
        return positions
    if isinstance(positions, slice):
        if positions.step is not None and positions.step < 1:
            raise ResidualError(f"slice step {positions.step} must be >= 1")
        return positions
    if isinstance(positions, (list, tuple, range)):
        return tuple(_as_int(p, "positions") for p in positions)
    raise ResidualError(f"positions {positions!r}: give None (all), an int, a slice, a list of ints or a callable")


def resolve(positions: Positions, offset: int, q: int, prompt_len: int) -> torch.Tensor | None:
    """Indices into this forward's q tokens (absolute positions offset .. offset + q - 1) chosen by
    `positions`, or None for all of them."""
    if positions is None:
        return None
    base = prompt_len
    if callable(positions):
        positions = positions(offset + q)
        base = offset + q
        if isinstance(positions, torch.Tensor):
            positions = positions.reshape(-1).tolist()
        if isinstance(positions, (list, tuple, range)):
            positions = tuple(_as_int(p, "the callable's positions") for p in positions)
        elif positions is not None and not isinstance(positions, (int, slice)):
            raise ResidualError(f"the positions callable returned {positions!r}: return ints, a list or a slice")
        if positions is None:
            return None
    if isinstance(positions, slice):
        start = 0 if positions.start is None else positions.start
        start = start + base if start < 0 else start
        stop = positions.stop
        stop = offset + q if stop is None else (stop + base if stop < 0 else stop)
        step = positions.step or 1
        chosen = range(max(start, 0), stop, step)
        local = [p - offset for p in chosen if offset <= p < offset + q]
    else:
        values = (positions,) if isinstance(positions, int) else positions
        local = sorted({(p + base if p < 0 else p) - offset for p in values} & set(range(q)) if q else set())
    return torch.tensor(local, dtype=torch.long)


# ---------------------------------------------------------------- the edits and captures of a thread


@dataclass(eq=False)
class _Site:
    """What a hook needs of one forward of one layer: its place in the sequence."""

    offset: int
    q: int
    prompt_len: int


@dataclass(eq=False)
class Direction:
    """One `add_direction` block: alpha * vector added at the output of `layer` at `positions`."""

    module: torch.nn.Module
    layer: int
    vector: torch.Tensor  # [hidden]
    alpha: float
    positions: Positions
    is_zero: bool = False  # alpha == 0 or a zero vector: the layer's output is returned untouched
    prompt_len: int = 0
    forwards: int = 0  # forwards of the layer seen inside the block
    _cast: dict = field(default_factory=dict)

    def delta(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = (self.alpha * self.vector.double()).to(like.device, like.dtype)
        return self._cast[key]


@dataclass(eq=False)
class Capture:
    """One `capture_residual` block: the residual stream after `layers` at `positions`, per forward.

    `activations` is [layers, P, hidden] over every position captured in the block, in order (a batch of
    one; `batched()` gives [B, layers, P, hidden]); `positions` the absolute position of each of the P.
    """

    modules: dict  # layer module -> layer index
    layers: tuple[int, ...]
    positions_spec: Positions
    device: str | torch.device | None = "cpu"
    positions: list[int] = field(default_factory=list)
    prompt_len: int = 0
    _chunks: list = field(default_factory=list)  # per forward: {layer: [B, p, hidden]}, absolute positions
    _pending: dict = field(default_factory=dict)

    def _record(self, layer: int, out: torch.Tensor, site: _Site) -> None:
        idx = resolve(self.positions_spec, site.offset, site.q, self.prompt_len)
        picked = out if idx is None else out[:, idx.to(out.device)]
        picked = picked.detach()
        picked = picked.to(self.device) if self.device is not None else picked
        where = list(range(site.offset, site.offset + site.q)) if idx is None else [site.offset + int(i) for i in idx]
        if layer == min(self.layers):  # the first captured layer of a new forward (layers run in order)
            self._pending.clear()
        self._pending[layer] = picked.clone() if picked.data_ptr() == out.data_ptr() else picked
        if len(self._pending) == len(self.layers):  # every layer of this forward is in: one chunk
            self._chunks.append(dict(self._pending))
            self.positions.extend(where)
            self._pending.clear()

    def batched(self) -> torch.Tensor:
        """[B, layers, P, hidden] over every forward of the block."""
        if not self._chunks:
            raise ResidualError("nothing was captured: run the model inside the `with capture_residual(...)` block")
        per_layer = [torch.cat([c[l] for c in self._chunks], dim=1) for l in self.layers]  # [B, P, H] each
        return torch.stack(per_layer, dim=1)

    @property
    def activations(self) -> torch.Tensor:
        """[layers, P, hidden] (a batch of one)."""
        x = self.batched()
        if x.shape[0] != 1:
            raise ResidualError(f"a batch of {x.shape[0]} was captured: use cap.batched() for [B, layers, P, hidden]")
        return x[0]


_ACTIVE: ContextVar[tuple] = ContextVar("gaze_residual", default=())
_LOCK = threading.Lock()
_HOOKS: WeakKeyDictionary = WeakKeyDictionary()  # layer module -> [handle, users]


def _seen_before(module: torch.nn.Module, layer: int, kwargs: dict, q: int) -> int:
    """Tokens the KV cache held before this forward of `layer` (its output is computed, so its keys are in)."""
    cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    try:
        return max(0, int(cache.get_seq_length(layer)) - q)
    except (TypeError, IndexError, ValueError):
        return 0


def _hook(module: torch.nn.Module, args, kwargs, output):
    active = _ACTIVE.get()
    if not active:
        return None
    mine = [a for a in active if (a.module is module if isinstance(a, Direction) else module in a.modules)]
    if not mine:
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    layer = mine[0].layer if isinstance(mine[0], Direction) else mine[0].modules[module]
    q = hidden.shape[1]
    offset = _seen_before(module, layer, kwargs, q)
    changed = hidden
    for a in mine:
        if q > 1 or offset == 0:  # a prefill (or a prompt suffix after a cached prefix): the prompt ends here
            a.prompt_len = offset + q
        site = _Site(offset, q, a.prompt_len)
        if isinstance(a, Direction):
            a.forwards += 1
            if a.is_zero:
                continue
            idx = resolve(a.positions, offset, q, a.prompt_len)
            if idx is not None and idx.numel() == 0:
                continue
            changed = changed.clone() if changed is hidden else changed
            if idx is None:
                changed = changed + a.delta(changed)
            else:
                idx = idx.to(changed.device)
                changed[:, idx] = changed[:, idx] + a.delta(changed)
        else:
            a._record(a.modules[module], changed, site)
    if changed is hidden:
        return None
    return (changed, *output[1:]) if isinstance(output, tuple) else changed


def _attach(modules: Sequence[torch.nn.Module]) -> None:
    with _LOCK:
        for m in modules:
            entry = _HOOKS.get(m)
            if entry is None:
                _HOOKS[m] = [m.register_forward_hook(_hook, with_kwargs=True), 1]
            else:
                entry[1] += 1


def _detach(modules: Sequence[torch.nn.Module]) -> None:
    with _LOCK:
        for m in modules:
            entry = _HOOKS.get(m)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] <= 0:
                entry[0].remove()
                del _HOOKS[m]


def hooked(module: torch.nn.Module) -> bool:
    """Whether a residual hook is on `module` now (False once every block using it has exited)."""
    return module in _HOOKS


@contextlib.contextmanager
def _activate(item, modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    _attach(modules)
    token = _ACTIVE.set(_ACTIVE.get() + (item,))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _detach(modules)


@contextlib.contextmanager
def add_direction(model, layer: int, vector, alpha: float = 1.0, *, positions: Positions = None) -> Iterator[Direction]:
    """Add `alpha * vector` to the output of decoder layer `layer` at `positions` (absolute; see the module
    docstring) for the calling thread, inside the block. `vector` is [hidden] (any float dtype; cast to
    the layer's). Yields the `Direction` (its `forwards` counts the layer's forwards seen)."""
    layer = check_layer(model, layer)
    v = torch.as_tensor(vector).detach()
    hidden = int(text_config(model).hidden_size)
    if v.ndim != 1 or v.shape[0] != hidden or not v.is_floating_point():
        raise ResidualError(f"the direction must be a float vector of the model's width [{hidden}], got "
                            f"{tuple(v.shape)} {v.dtype}")
    if not bool(torch.isfinite(v).all()):
        raise ResidualError("the direction has NaN or infinite entries")
    alpha = float(alpha)
    if alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise ResidualError(f"alpha {alpha} is not a finite number")
    module = decoder_layers(model)[layer]
    edit = Direction(module=module, layer=layer, vector=v, alpha=alpha, positions=check_positions(positions),
                     is_zero=alpha == 0 or not bool(v.any()))
    with _activate(edit, [module]):
        yield edit


@contextlib.contextmanager
def capture_residual(model, layers: int | Sequence[int] | None = None, positions: Positions = -1, *,
                     device: str | torch.device | None = "cpu") -> Iterator[Capture]:
    """Record the output of decoder `layers` (None: all; an int: one) at `positions` (default -1: the last
    prompt token) for the calling thread. `cap.activations` is [layers, P, hidden], copied to `device`
    (None: where the model computed them), in the model's dtype."""
    all_layers = decoder_layers(model)
    if layers is None:
        chosen = tuple(range(len(all_layers)))
    elif isinstance(layers, int) and not isinstance(layers, bool):
        chosen = (check_layer(model, layers),)
    else:
        chosen = tuple(check_layer(model, int(l)) for l in layers)
        if not chosen or len(set(chosen)) != len(chosen):
            raise ResidualError(f"layers {list(layers)}: give distinct layer indices, at least one")
    modules = {all_layers[l]: l for l in chosen}
    cap = Capture(modules=modules, layers=chosen, positions_spec=check_positions(positions), device=device)
    with _activate(cap, list(modules)):
        yield cap
