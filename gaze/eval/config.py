"""`gaze eval`'s settings: protocols, conditions, file names, and `EvalConfig` (one field per CLI flag).

Light on purpose (no torch): `gaze --help` builds the eval flags from these defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gaze.errors import GazeError
from gaze.prompts import NARRATION_PROMPT, STRIP_QUESTION, THIS_PANEL_QUESTION

PROTOCOLS = ("vqa", "narration", "dynamic", "region", "sweep", "strength", "paraphrase")
DEFAULT_PROTOCOLS = PROTOCOLS[:5]  # strength and paraphrase (gaze.eval.sweeps) run when asked for
CONDITIONS = ("gaze", "random", "all", "image", "localization", "none")
PROTOCOL_ORDER = ("vqa", "sweep", "strength", "paraphrase", "narration", "dynamic", "region")  # sweeps reuse vqa answers
SPLIT_SEEDS = {"eval": 1_000_000, "discovery": 2_000_000}  # procedural:SPLIT -> datagen seeds SEED0 + i
# eval seeds are the organism's held-out range (gaze.organism.train.EVAL_SEED0); training draws its own pool
SIZE_CLASSES = (("small", 2), ("medium", 8), ("large", math.inf))  # object size by image tokens covered (<=)

LETTER_STRIP_QUESTION = "Which letter is in this comic strip? Answer with one letter."
LETTER_PANEL_QUESTION = "Which letter is on this panel?"
DEFAULT_QUESTIONS = {  # protocol -> question, for caption-like judges
    "vqa": STRIP_QUESTION, "sweep": STRIP_QUESTION, "narration": THIS_PANEL_QUESTION,
    "dynamic": NARRATION_PROMPT, "region": THIS_PANEL_QUESTION,
    "strength": STRIP_QUESTION, "paraphrase": STRIP_QUESTION,  # the sweeps ask the vqa question (and rewordings)
}
COCO_QUESTION = "What is the main object in this part of the image? Answer in a few words."  # paper, app. D.6
LETTER_QUESTIONS = {"vqa": LETTER_STRIP_QUESTION, "sweep": LETTER_STRIP_QUESTION, "narration": LETTER_PANEL_QUESTION}

RECORDS = "records.jsonl"
AGGREGATE = "aggregate.json"
MANIFEST = "eval.json"
TRAJECTORIES = "trajectories.json"
PRIOR = "prior_heads.json"


class EvalError(GazeError):
    """An evaluation that cannot run as asked; the message says how to fix it."""


@dataclass(frozen=True)
class EvalConfig:
    """`gaze eval`: every setting of an evaluation run (CLI flags share these names)."""

    model: str = "organism"  # hub id, local folder, or "organism"
    ranking: str | None = None  # ranking folder, JSON or hub id (`gaze discover`); None: discover into OUT/discovery
    strips: str = "procedural:eval"  # strip source: `load_strips` source, or procedural:SPLIT (eval|discovery|SEED0)
    n_strips: int = 50  # strips per protocol (x targets x conditions generations)
    out: str = "runs/eval"  # output folder (resumable)
    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS  # which protocols to run (of PROTOCOLS)
    conditions: tuple[str, ...] = CONDITIONS  # which head sets to steer
    top_k: int | None = None  # K for every condition; None: the paper's share (100/1,152 of all heads), >= 1
    ks: tuple[int, ...] = (1, 2, 4, 8)  # K values of the head-count sweep (capped at the model's head count)
    strengths: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)  # strength sweep: biases B (paper, app. D.1)
    paraphrases: str | None = None  # paraphrase sweep: file of wordings, one a line; None: the paper's (app. D.4)
    targets: tuple[int, ...] | None = None  # panels to steer to (1-based); None: every panel
    every: int = 10  # dynamic narration: tokens per schedule entry (the paper: 50 for long 8B narrations)
    at_sentence: bool = False  # dynamic narration: switch at the first sentence end after `every` tokens
    seed: int = 0  # random heads, derangements, bootstrap
    judge: str = "caption"  # caption | letter | embedding | llm
    judge_model: str | None = None  # embedding model / LLM (endpoint model name or local folder)
    judge_endpoint: str | None = None  # OpenAI-compatible base URL for --judge llm (key from $OPENAI_API_KEY)
    judge_allow_http: bool = False  # send the judge's API key over plain http to a non-loopback host
    max_new_tokens: int = 24  # short answers: vqa, sweep, region
    narration_tokens: int = 64  # static narration answers
    strength: float = 1e4  # steering bias B
    mode: str = "boost"  # boost | suppress | suppress_text
    phase: str = "all"  # all | prefill (static targets bias the prompt's rows only; schedules always steer every row) | decode
    random_percentile: float = 5.0  # random heads come from this bottom share of gaze scores (widened to 2K heads)
    prior_strips: int = 8  # strips for the image / localization head criteria
    scenes: str = "procedural"  # region protocol: procedural[:SEED0] (datagen scenes), strip-objects, coco:PATH, or a folder
    n_scenes: int | None = None  # scenes for the region protocol; None: n_strips
    n_objects: int = 4  # objects per procedural scene
    scene_size: tuple[int, int] = (384, 192)  # procedural scene (width, height) in pixels
    panel_size: int = 64  # procedural strips: panel height in pixels
    assembly: str = "paper"  # procedural strips: "paper" (common height, widths of their own, 6 px gaps) | "aligned"
    questions: tuple[tuple[str, str], ...] = ()  # (protocol, question) overrides
    discovery_strips: str = "procedural:discovery"  # used when `ranking` is None
    n_discovery: int = 20  # strips for that discovery
    n_boot: int = 2000  # bootstrap resamples
    device: str | None = None  # cpu, cuda, ... (default: cuda if available)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device_map: str | None = None  # "auto": spread a large model over all GPUs

    def question(self, protocol: str) -> str:
        given = dict(self.questions)
        if protocol in given:
            return given[protocol]
        if self.judge == "letter" and protocol in LETTER_QUESTIONS:
            return LETTER_QUESTIONS[protocol]
        if protocol == "region" and self.scenes.startswith("coco:"):  # the paper's question about an object box
            return COCO_QUESTION
        return DEFAULT_QUESTIONS[protocol]

    def check(self) -> "EvalConfig":
        if self.assembly not in ("paper", "aligned"):
            raise EvalError(f"--assembly is 'paper' or 'aligned', not {self.assembly!r}")
        bad = set(self.protocols) - set(PROTOCOLS)
        if bad:
            raise EvalError(f"unknown protocols {sorted(bad)}; use some of {','.join(PROTOCOLS)}")
        bad = set(self.conditions) - set(CONDITIONS)
        if bad:
            raise EvalError(f"unknown conditions {sorted(bad)}; use some of {','.join(CONDITIONS)}")
        bad = {p for p, _ in self.questions} - set(PROTOCOLS)
        if bad:
            raise EvalError(f"--question for unknown protocols {sorted(bad)}: write PROTOCOL=TEXT, e.g. vqa=...")
        if self.n_strips < 1 or self.every < 1 or (self.top_k is not None and self.top_k < 1):
            raise EvalError("--n-strips, --every and --top-k must be at least 1")
        if any(not 0 < s <= 1e9 for s in self.strengths):
            raise EvalError(f"--strengths must be positive biases, got {list(self.strengths)}")
        if any(k < 1 for k in self.ks):
            raise EvalError(f"--ks must be positive head counts, got {list(self.ks)}")
        return self
