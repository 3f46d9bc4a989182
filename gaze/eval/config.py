"""`gaze eval`'s settings: protocols, conditions, file names, presets, and `EvalConfig` (one field per CLI flag).

Light on purpose (no torch): `gaze --help` builds the eval flags from these defaults.

Presets (`PRESETS`, docs/paper-protocol.md): the settings a field left at None takes. "paper" is the paper's
protocol as its official code runs it (the default for real checkpoints); "organism" the shipped tiny model's
short one (the default for "organism" and for any folder with a prompts.json). Explicit values win;
`resolve_preset` fills the rest, and the run manifest records every resolved value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gaze.errors import GazeError
from gaze.prompts import DYNAMIC_NARRATION_PROMPT, NARRATION_PROMPT, STRIP_QUESTION, THIS_PANEL_QUESTION

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

ASSEMBLIES = ("paper", "aligned", "official")  # procedural strips, see `gaze.eval.protocols.eval_strips`
MAPPINGS = ("centre", "proportional")  # panel boxes -> image tokens, see `gaze.regions.panel_regions`
IDENTICAL_UNITS = ("word", "token")  # what the baseline-identical rule's Jaccard counts
PHASES = ("all", "prefill", "decode")

# The settings each preset gives the fields left at None (docs/paper-protocol.md cites every value).
PRESETS: dict[str, dict] = {
    "paper": dict(
        max_new_tokens=15,  # VQA answers (official 03_steer_vqa.py --max-new-tokens 15)
        narration_tokens=100,  # static narration (04_steer_static_narration.py, "~100 token" answers)
        every=50,  # dynamic narration: a new target every 50 decode tokens, 6 x 50 = 300 tokens in all
        phase="all",  # vqa / narration: prefill and decode ("the paper recipe"; --full-sequence)
        dynamic_phase="decode",  # dynamic narration: decode steps only (05_...py default decode_only=True)
        panel_size=256,  # common panel height (gaze_heads/common.py DEFAULT_TARGET_HEIGHT)
        assembly="official",  # widths rounded to multiples of 32, 6 px white painted over each seam
        mapping="proportional",  # grid columns split in proportion to panel widths (gaze_heads/regions.py)
        identical_threshold=0.85,  # steered ~ baseline (word Jaccard >= 0.85) is a miss (gaze_heads/judge.py)
        identical_tokens="word",
    ),
    "organism": dict(
        max_new_tokens=24, narration_tokens=64, every=10, phase="all",
        dynamic_phase=None,  # as `phase` (a schedule steers every row when phase is "prefill")
        panel_size=64, assembly="paper", mapping="centre", identical_threshold=0.85, identical_tokens="word",
    ),
}
PAPER_QUESTIONS = {"dynamic": DYNAMIC_NARRATION_PROMPT}  # the paper preset's questions beside DEFAULT_QUESTIONS

RECORDS = "records.jsonl"
AGGREGATE = "aggregate.json"
MANIFEST = "eval.json"
TRAJECTORIES = "trajectories.json"
PRIOR = "prior_heads.json"


JUDGE_CALIBRATIONS = ("captions", "answers", "none")  # what an image judge is calibrated on first


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
    every: int | None = None  # dynamic narration: tokens per schedule entry (None: the preset's; paper 50)
    at_sentence: bool = False  # dynamic narration: switch at the first sentence end after `every` tokens
    seed: int = 0  # random heads, derangements, bootstrap
    judge: str = "caption"  # caption | letter | embedding | llm
    judge_model: str | None = None  # embedding model / LLM (endpoint model name or local folder)
    judge_endpoint: str | None = None  # OpenAI-compatible base URL for --judge llm (key from $OPENAI_API_KEY)
    judge_allow_http: bool = False  # send the judge's API key over plain http to a non-loopback host
    preset: str = "auto"  # paper | organism | auto (organism for "organism" or a folder with prompts.json, else paper)
    max_new_tokens: int | None = None  # short answers: vqa, sweep, region (None: the preset's)
    narration_tokens: int | None = None  # static narration answers (None: the preset's)
    # judges that see the image (--judge vlm | hosted; gaze.eval.image_judges); JUDGE_CALIBRATIONS above
    judge_api: str = "openai"  # hosted judge's format: openai (chat completions, also vLLM ...) | anthropic (messages)
    judge_key_env: str | None = None  # env var with the hosted judge's key; None: OPENAI_API_KEY / ANTHROPIC_API_KEY
    judge_retries: int = 5  # retries of a hosted call on HTTP 429, 5xx or a timeout (exponential backoff)
    judge_calibration: str = "captions"  # what an image judge is calibrated on: captions | answers (the model's) | none
    judge_calibration_strips: int = 5  # strips (x their panels) of known answers for that calibration
    judge_min_accuracy: float | None = 0.8  # refuse an image judge below this calibration accuracy; None: never
    strength: float = 1e4  # steering bias B
    mode: str = "boost"  # boost | suppress | suppress_text
    phase: str | None = None  # all | prefill (the prompt's rows only) | decode; vqa, narration, region, sweep
    dynamic_phase: str | None = None  # the dynamic schedule's phase: all | decode (None: the preset's, else `phase`)
    mapping: str | None = None  # centre | proportional: which image tokens a panel box owns (None: the preset's)
    identical_threshold: float | None = None  # steered vs unsteered Jaccard >= this: a miss (> 1 disables)
    identical_tokens: str | None = None  # word (normalised words) | token (the model's tokenizer)
    random_percentile: float = 5.0  # bottom-p control: random heads come from this bottom share of gaze scores
    # the random condition's control heads (gaze.eval.controls)
    control: str = "bottom-p"  # bottom-p | layer-band | layer-matched
    control_draws: int = 10  # seeded draws of the control set, each its own condition run (random:0, random:1, ...)
    control_band: tuple[float, float] = (0.55, 1.0)  # layer-band: [low, high) fractions of depth (paper: 20-35 of 36)
    control_widen: bool = False  # bottom-p: widen a pool under 2K heads to 2K (else it is reported, not widened)
    prior_strips: int = 8  # strips for the image / localization head criteria
    scenes: str = "procedural"  # region protocol: procedural[:SEED0] (datagen scenes), strip-objects, coco:PATH, or a folder
    n_scenes: int | None = None  # scenes for the region protocol; None: n_strips
    n_objects: int = 4  # objects per procedural scene
    scene_size: tuple[int, int] = (384, 192)  # procedural scene (width, height) in pixels
    panel_size: int | None = None  # procedural strips: panel height in pixels (None: the preset's)
    assembly: str | None = None  # procedural strips: paper | aligned | official (None: the preset's)
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
        if self.preset not in ("auto", *PRESETS):
            raise EvalError(f"--preset is auto, {' or '.join(PRESETS)}, not {self.preset!r}")
        for name, allowed in (("assembly", ASSEMBLIES), ("mapping", MAPPINGS), ("identical_tokens", IDENTICAL_UNITS),
                              ("phase", PHASES), ("dynamic_phase", ("all", "decode"))):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise EvalError(f"--{name.replace('_', '-')} is one of {', '.join(allowed)}, not {value!r}")
        if self.identical_threshold is not None and not self.identical_threshold >= 0:
            raise EvalError(f"--identical-threshold {self.identical_threshold}: give a Jaccard similarity in [0, 1] "
                            "(above 1, e.g. 1.01, turns the rule off)")
        bad = set(self.protocols) - set(PROTOCOLS)
        if bad:
            raise EvalError(f"unknown protocols {sorted(bad)}; use some of {','.join(PROTOCOLS)}")
        bad = set(self.conditions) - set(CONDITIONS)
        if bad:
            raise EvalError(f"unknown conditions {sorted(bad)}; use some of {','.join(CONDITIONS)}")
        bad = {p for p, _ in self.questions} - set(PROTOCOLS)
        if bad:
            raise EvalError(f"--question for unknown protocols {sorted(bad)}: write PROTOCOL=TEXT, e.g. vqa=...")
        every = 1 if self.every is None else self.every
        if self.n_strips < 1 or every < 1 or (self.top_k is not None and self.top_k < 1):
            raise EvalError("--n-strips, --every and --top-k must be at least 1")
        from gaze.eval.controls import ControlSpec

        ControlSpec.from_config(self)
        if self.judge_api not in ("openai", "anthropic") or self.judge_calibration not in JUDGE_CALIBRATIONS:
            raise EvalError("--judge-api is openai or anthropic; --judge-calibration is captions, answers or none")
        if self.judge_calibration_strips < 1 or self.judge_retries < 0 or not 0 <= (self.judge_min_accuracy or 0) <= 1:
            raise EvalError("--judge-calibration-strips >= 1, --judge-retries >= 0, --judge-min-accuracy in [0, 1]")
        if any(not 0 < s <= 1e9 for s in self.strengths):
            raise EvalError(f"--strengths must be positive biases, got {list(self.strengths)}")
        if any(k < 1 for k in self.ks):
            raise EvalError(f"--ks must be positive head counts, got {list(self.ks)}")
        return self


def preset_for(model: str) -> str:
    """The preset "auto" means for `model`: "organism" for the shipped organism or a folder that records its own
    prompts (prompts.json, as the organism's does), "paper" for anything else (hub ids, real checkpoints)."""
    from pathlib import Path

    if model == "organism" or (Path(model) / "prompts.json").is_file():
        return "organism"
    return "paper"


def resolve_preset(cfg: EvalConfig) -> EvalConfig:
    """`cfg` with its preset named and every field left at None given the preset's value (explicit values win)."""
    from dataclasses import replace

    cfg.check()
    name = preset_for(cfg.model) if cfg.preset == "auto" else cfg.preset
    values = {k: v for k, v in PRESETS[name].items() if getattr(cfg, k) is None}
    out = replace(cfg, preset=name, **values)
    if out.dynamic_phase is None:  # the organism's: as `phase`, and a schedule always steers the answer's rows
        out = replace(out, dynamic_phase="all" if out.phase == "prefill" else out.phase)
    if name == "paper":
        given = dict(cfg.questions)
        out = replace(out, questions=tuple({**PAPER_QUESTIONS, **given}.items()))
    return out.check()
