"""Server-side state of the Space: the one model (loaded lazily, once), its ranking, and stop switches.

    settings = Settings.from_env(model="organism")   # GAZE_MODEL, GAZE_DEVICE, ... (deployment knobs)
    holder = ModelHolder(settings)                    # nothing is loaded yet
    ready = holder.get()                              # first call loads; every later call returns the same

The ranking comes from, in order: `GAZE_RANKING` (a ranking.json or folder);
the organism's shipped `gaze/organism/weights/ranking.json`; a cached ranking under
`$GAZE_CACHE/rankings/<model-id>/` (default `~/.cache/gaze`); else it is
discovered on first use over the bundled example strips and cached there.

Visitors never share steering: gaze's hooks belong to the thread that runs
`generate`, and every request runs its own. What they do share is the model
weights (read-only) and this holder.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from gaze.discovery import discover
from gaze.generation import PrefixCache
from gaze.models import ORGANISM_DIR, Loaded, load
from gaze.ranking import Ranking
from space.limits import MAX_SESSIONS, MAX_UPLOAD_MB, PREFIX_PER_SESSION, PREFIX_SESSIONS, SESSION_TTL

DEFAULT_CACHE = Path.home() / ".cache" / "gaze"


@dataclass(frozen=True)
class Settings:
    """Deployment knobs; each has an environment variable (in brackets)."""

    model: str = "organism"  # [GAZE_MODEL] "organism", a hub id (Qwen/Qwen3-VL-2B-Instruct) or a local folder
    device: str | None = None  # [GAZE_DEVICE] default: cuda when present, else cpu
    dtype: str | None = None  # [GAZE_DTYPE] default: float32 on cpu, bfloat16 on cuda
    ranking: str | None = None  # [GAZE_RANKING] a ranking.json or folder; default: shipped / cached / discovered
    cache_dir: Path = DEFAULT_CACHE  # [GAZE_CACHE] where discovered rankings are kept
    discovery_strips: int = 8  # [GAZE_DISCOVERY_STRIPS] strips to rank heads on when no ranking exists
    default_k: int | None = None  # [GAZE_TOP_K] the K slider's start; default: see `default_k`
    prefill_only: bool = False  # [GAZE_PREFILL_ONLY=1] "steer the prompt only" ticked at start (the published
    # default, unticked, biases the answer's rows too; the bundled organism redirects far better ticked: README)
    preload: bool = False  # [GAZE_PRELOAD=1] load at start-up instead of on first use (ZeroGPU wants this)
    concurrency: int = 2  # [GAZE_CONCURRENCY] answers generated at once (each in its own thread)
    queue_size: int = 64  # [GAZE_QUEUE_SIZE] visitors waiting at most; more get "queue full"
    max_upload_mb: int = MAX_UPLOAD_MB  # [GAZE_MAX_UPLOAD_MB] larger uploads are refused (at the upload and in the handler)
    max_sessions: int = MAX_SESSIONS  # [GAZE_MAX_SESSIONS] visitors' states kept at most (least recently used dropped)
    session_ttl: float = SESSION_TTL  # [GAZE_SESSION_TTL] s after its last change that a visitor's state is dropped

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb) << 20

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        s = cls(
            model=env.get("GAZE_MODEL", cls.model),
            device=env.get("GAZE_DEVICE") or None,
            dtype=env.get("GAZE_DTYPE") or None,
            ranking=env.get("GAZE_RANKING") or None,
            cache_dir=Path(env["GAZE_CACHE"]) if env.get("GAZE_CACHE") else DEFAULT_CACHE,
            discovery_strips=int(env.get("GAZE_DISCOVERY_STRIPS", cls.discovery_strips)),
            default_k=int(env["GAZE_TOP_K"]) if env.get("GAZE_TOP_K") else None,
            prefill_only=env.get("GAZE_PREFILL_ONLY", "") == "1",
            preload=env.get("GAZE_PRELOAD", "") == "1",
            concurrency=int(env.get("GAZE_CONCURRENCY", cls.concurrency)),
            queue_size=int(env.get("GAZE_QUEUE_SIZE", cls.queue_size)),
            max_upload_mb=int(env.get("GAZE_MAX_UPLOAD_MB", cls.max_upload_mb)),
            max_sessions=int(env.get("GAZE_MAX_SESSIONS", cls.max_sessions)),
            session_ttl=float(env.get("GAZE_SESSION_TTL", cls.session_ttl)),
        )
        return replace(s, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Ready:
    """A loaded model and the ranking of its heads."""

    loaded: Loaded
    ranking: Ranking
    ranking_source: str  # where the ranking came from, shown in the page

    @property
    def n_heads_total(self) -> int:
        return self.loaded.n_layers * self.loaded.n_heads


def default_k(settings: Settings, ready: Ready) -> int:
    """Heads steered by default: GAZE_TOP_K; else 4 on a small model (the organism's clear top set is
    3-6 heads), and about 8.7% of the heads on a large one (the paper's K = 100 of Qwen3-VL-8B's 1,152)."""
    total = ready.n_heads_total
    if settings.default_k:
        return max(1, min(settings.default_k, total))
    return min(4, total) if total <= 64 else max(1, round(0.087 * total))


def cache_name(model_id: str) -> str:
    """A folder name for a model id or path: 'Qwen/Qwen3-VL-2B-Instruct' -> 'Qwen--Qwen3-VL-2B-Instruct'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", str(model_id).strip("/")).strip("-") or "model"


def discovery_strips(n: int):
    """Strips to rank heads on: the bundled example strips, then (if more are asked) fresh procedural ones."""
    from space.scene import example_entries, load_example

    entries = example_entries("strip")[:n]
    strips = []
    for e in entries:
        scene = load_example(e["name"])
        from gaze.strips import Strip

        strips.append(Strip(scene.image, scene.panels, strip_id=e["name"], captions=scene.captions))
    if n > len(strips):
        from datagen import make_strip  # only needed beyond the bundled strips

        strips += [make_strip(3_100_000 + i, panel_size=64, align=32) for i in range(n - len(strips))]
    return strips


def resolve_ranking(settings: Settings, loaded: Loaded) -> tuple[Ranking, str]:
    """The model's ranking and a line saying where it came from (discovering and caching it if needed)."""
    if settings.ranking:
        return Ranking.load(settings.ranking).check(loaded.model), f"from {settings.ranking}"
    shipped = ORGANISM_DIR / "ranking.json"
    if settings.model == "organism" and shipped.exists():
        return Ranking.load(shipped).check(loaded.model), "shipped with the organism (gaze/organism/weights/ranking.json)"
    folder = settings.cache_dir / "rankings" / cache_name(loaded.model_id)
    if (folder / "ranking.json").exists():
        return Ranking.load(folder).check(loaded.model), f"cached at {folder}"
    strips = discovery_strips(settings.discovery_strips)
    ranking = discover(loaded, strips, folder, source="space examples", n_strips=len(strips), progress=False)
    return ranking, f"discovered on first use over {len(strips)} example strips, cached at {folder}"


class ModelHolder:
    """Loads the model and its ranking once, on first use, from any thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._ready: Ready | None = None

    @property
    def is_loaded(self) -> bool:
        return self._ready is not None

    def get(self) -> Ready:
        ready = self._ready
        if ready is not None:
            return ready
        with self._lock:  # the first caller loads; the others wait for it and share the result
            if self._ready is None:
                s = self.settings
                device = s.device
                dtype = s.dtype
                if dtype is None:
                    from gaze.models import default_device

                    dtype = "bfloat16" if (device or default_device()).startswith("cuda") else "float32"
                loaded = load(s.model, device=device, dtype=dtype)
                ranking, source = resolve_ranking(s, loaded)
                self._ready = Ready(loaded, ranking, source)
            return self._ready


@dataclass
class StopSwitches:
    """One stop switch per browser session: the Stop button sets it, the running generation checks it."""

    _events: dict[str, threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, session: str) -> threading.Event:
        """A fresh switch for a new generation; a generation still running in this session is stopped."""
        with self._lock:
            old = self._events.get(session)
            if old is not None:
                old.set()
            event = self._events[session] = threading.Event()
            return event

    def stop(self, session: str) -> bool:
        with self._lock:
            event = self._events.get(session)
        if event is None:
            return False
        event.set()
        return True

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]


def launch_options(settings: Settings) -> dict:
    """`demo.launch(**launch_options(settings))`: the server-side bounds (upload size, sessions kept).

    `show_error`: an error raised inside Gradio before a handler runs (an
    upload that is not an image, one beyond PIL's own pixel limit) is shown in
    the page with its message; handlers' own errors are short `gr.Error`s anyway.
    """
    return {"max_file_size": settings.max_upload_bytes, "state_session_capacity": settings.max_sessions,
            "show_error": True}


def on_gpu(fn, duration: int = 120):
    """`spaces.GPU` on Hugging Face Spaces (ZeroGPU asks for a GPU per call); unchanged anywhere else."""
    try:
        import spaces  # installed on Hugging Face Spaces only
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


class SessionPrefixes:
    """Each visitor's `gaze.generation.PrefixCache` (their images' prompt prefixes), bounded twice: at most
    `per_session` images per visitor and `max_sessions` visitors (least recently active dropped first)."""

    def __init__(self, max_sessions: int = PREFIX_SESSIONS, per_session: int = PREFIX_PER_SESSION):
        self.max_sessions, self.per_session = int(max_sessions), int(per_session)
        self._caches: OrderedDict[str, PrefixCache] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._caches)

    def get(self, session: str) -> PrefixCache:
        with self._lock:
            cache = self._caches.get(session)
            if cache is None:
                cache = self._caches[session] = PrefixCache(self.per_session)
            self._caches.move_to_end(session)
            while len(self._caches) > self.max_sessions:
                self._caches.popitem(last=False)
            return cache

    def nbytes(self) -> int:
        with self._lock:
            caches = list(self._caches.values())
        return sum(c.nbytes() for c in caches)


@dataclass
class LiveAnswers:
    """The hover answer running in each session: its moving target and its own stop switch.

    A move (`retarget`) reaches only the session's hover answer; leaving the image (`leave`) stops only that
    answer, never one a click started meanwhile."""

    _running: dict = field(default_factory=dict)  # session -> (LiveTarget, threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, session: str, live, stop: threading.Event) -> None:
        with self._lock:
            self._running[session] = (live, stop)

    def get(self, session: str):
        with self._lock:
            entry = self._running.get(session)
        return None if entry is None or entry[1].is_set() else entry[0]

    def leave(self, session: str) -> bool:
        with self._lock:
            entry = self._running.pop(session, None)
        if entry is None:
            return False
        entry[1].set()
        return True

    def finish(self, session: str, live) -> None:
        with self._lock:
            entry = self._running.get(session)
            if entry is not None and entry[0] is live:
                del self._running[session]
