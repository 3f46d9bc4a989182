"""Judges that see the image, as the paper's does; their calibration; re-judging a finished run.

    judge = VLMJudge.load("Qwen/Qwen3-VL-8B-Instruct", device="cuda", dtype="bfloat16")
    judge = HostedJudge("anthropic", "claude-sonnet-4-6")          # key from $ANTHROPIC_API_KEY
    verdict = judge.judge("the cat digs a hole", strip, target_panel=2)
    verdict.matched_panel, verdict.junk, verdict.raw, verdict.scores

The judge is shown the strip image and the answer, never the captions, and
must name the ONE panel (1..N, left to right) the answer describes, ignoring
any panel numbers written in the answer (models number their sentences in
order whatever they describe); a junk flag marks degenerate or irrelevant
answers, which count as misses. Empty or looping answers are junk without
asking (`judges.degenerate_reason`).

    VLMJudge     any VLM gaze loads (`gaze.load`: hub id or folder, every supported family).
                 Scored by likelihood, not by parsing: one forward pass, the next-token
                 probabilities of the options "1".."N" and "0" (junk) after the prompt,
                 renormalised over those options. The forced choice is the likeliest panel;
                 junk when "0" is likelier than every panel. Robust for small models, which
                 rarely produce well-formed replies; `Verdict.scores` keeps the probabilities.
    HostedJudge  OpenAI chat completions or Anthropic messages, the image inline as base64
                 JPEG; asks for {"panel", "junk", "reason"} JSON (parsed leniently); key from
                 a named environment variable, sent only over https or to a loopback server;
                 429 / 5xx / timeouts retried with exponential backoff.

Calibration first (`calibrate`): the judge reads answers whose panel is known,
the strips' ground-truth captions (`source="captions"`) or the evaluated
model's own unsteered answers to "What is happening in the k-th panel?"
(`"answers"`; these carry the model's own mistakes), and its accuracy, 6 x 6
confusion and how often it picks each panel are stored
(OUT/judges/NAME/calibration.json). Below `--judge-min-accuracy` its verdicts
are refused before any generation.

Every eval record keeps each judge's verdict in `record["verdicts"][judge.name]`
(with the raw reply), so `rejudge` (`gaze eval --rejudge --out OUT --judge ...`)
re-judges a run from records.jsonl and the strips, without the evaluated model,
and writes that judge's aggregate to OUT/judges/NAME/aggregate.json.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gaze.eval.judges import (JudgeError, Post, Verdict, _need_target, _urllib_post, checked_endpoint,
                              degenerate_reason, public_url, retrying)
from gaze.strips import Strip

JUDGES_DIR = "judges"  # OUT/judges/NAME/: calibration.json, and aggregate.json after a re-judge
CALIBRATION = "calibration.json"
CALIBRATION_ANSWERS = "calibration_answers.json"  # the evaluated model's own panel answers, reused by rejudge
PANEL_PROTOCOLS = ("vqa", "narration", "sweep")  # protocols judged by the run's judge (dynamic, region: captions)


# ---------------------------------------------------------------- the prompt and its reply

def judge_prompt(answer: str, n_panels: int, reply: str = "json") -> str:
    """What an image judge is asked beside the strip. `reply`: "json" (hosted) or "digit" (likelihood scoring)."""
    text = (f"This image is a comic strip of {n_panels} panels, numbered 1 to {n_panels} from left to right.\n\n"
            f"An answer given about it:\n\"\"\"{answer.strip()}\"\"\"\n\n"
            "Which single panel does the answer describe? Ignore any panel numbers written in the answer "
            "(\"Panel 1:\", \"the second panel\"): models number their sentences in order, whatever panel they "
            "describe. Decide by what each panel shows: its action, objects and setting. If the answer is generic, "
            "still pick the panel it fits best. If it is empty, repetitive, incoherent, or not about this strip, "
            "it is junk.\n\n")
    if reply == "digit":
        return text + f"Reply with one digit: the panel number (1-{n_panels}), or 0 if the answer is junk."
    return text + ('Reply with a JSON object only: {"panel": <1-' + str(n_panels) + ' or null>, "junk": <true or '
                   'false>, "reason": "<one sentence>"}')


def parse_reply(reply: str, n_panels: int) -> tuple[int | None, bool, str]:
    """(panel or None, junk, reason) from a judge's reply: the first JSON object that parses, else a lone number."""
    text = reply or ""
    for m in re.finditer(r"\{[^{}]*\}", text):
        try:
            data = json.loads(m.group())
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            continue
        junk = data.get("junk", data.get("is_junk", False)) is True
        raw = data.get("panel", data.get("matched_panel"))
        panel = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        if isinstance(raw, str) and raw.strip().isdigit():
            panel = int(raw)
        if panel is not None and not 1 <= panel <= n_panels:
            panel = None
        return (None if junk else panel), junk, str(data.get("reason", data.get("reasoning", "")))[:200]
    numbers = re.findall(r"\b\d+\b", text)
    if len(numbers) == 1 and 1 <= int(numbers[0]) <= n_panels:
        return int(numbers[0]), False, "a bare number"
    return None, bool(re.search(r"\bjunk\b", text, re.IGNORECASE)), "the reply names no single panel"


def _verdict(panel: int | None, junk: bool, target: int, why: str, **kw) -> Verdict:
    return Verdict(panel, panel is not None and not junk and panel == target, why, junk=junk, **kw)


def _junk_without_asking(answer: str, target: int) -> Verdict | None:
    bad = degenerate_reason(answer)
    return None if bad is None else _verdict(None, True, target, f"junk: {bad}")


def encode_image(image, quality: int = 90) -> tuple[str, str]:
    """(media type, base64) of a strip image as sent to a hosted judge: JPEG (small; under the APIs' size limits)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "image/jpeg", base64.standard_b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------- hosted judges

@dataclass(frozen=True)
class _Api:
    base: str  # default base URL
    base_env: str  # environment variable that may override it
    path: str  # appended to the base
    key_env: str  # default key variable
    host: str  # the official host, where a key is required
    model: str  # default model


APIS = {
    "openai": _Api("https://api.openai.com/v1", "OPENAI_BASE_URL", "/chat/completions", "OPENAI_API_KEY",
                   "api.openai.com", "gpt-4o-mini"),
    "anthropic": _Api("https://api.anthropic.com/v1", "ANTHROPIC_BASE_URL", "/messages", "ANTHROPIC_API_KEY",
                      "api.anthropic.com", "claude-sonnet-4-6"),  # the paper's reference judge
}
ANTHROPIC_VERSION = "2023-06-01"


def request_body(api: str, model: str, prompt: str, media_type: str, data: str, max_tokens: int) -> dict:
    """The JSON body of one judge call in `api`'s format (the image first, then the question)."""
    if api == "anthropic":  # no temperature: recent Claude models refuse non-default sampling settings
        image = {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
        return {"model": model, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": [image, {"type": "text", "text": prompt}]}]}
    image = {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    return {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": prompt}]}]}


def reply_text(api: str, data: dict) -> str:
    """The text of a chat-completions or messages response."""
    if api == "anthropic":
        blocks = data["content"]
        return "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    content = data["choices"][0]["message"]["content"]
    if isinstance(content, list):  # some servers answer with content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


class HostedJudge:
    """A hosted VLM judge: `api` "openai" (chat completions, any compatible server: OpenAI, vLLM, ...) or
    "anthropic" (messages). The key is read from `api_key_env` (default OPENAI_API_KEY / ANTHROPIC_API_KEY),
    held in memory only, and sent only over https or to a loopback server unless `allow_http`; redirects are not
    followed; the name and records show the endpoint without credentials (`public_url`). `post` replaces the
    HTTP call (tests); every call is retried on 429, 5xx and timeouts (`judges.retrying`)."""

    sees_image = True

    def __init__(self, api: str = "openai", model: str | None = None, *, base_url: str | None = None,
                 api_key_env: str | None = None, post: Post | None = None, timeout: float = 60.0,
                 allow_http: bool = False, retries: int = 5, backoff: float = 1.0, max_tokens: int = 200):
        if api not in APIS:
            raise JudgeError(f"unknown judge API {api!r}: use --judge-api openai (chat completions, also vLLM and "
                             "other compatible servers) or anthropic (messages)")
        spec = APIS[api]
        self.api, self.model, self.max_tokens = api, model or spec.model, max_tokens
        base = (base_url or os.environ.get(spec.base_env) or spec.base).rstrip("/")
        key_env = api_key_env or spec.key_env
        key = os.environ.get(key_env)
        checked_endpoint(base, key, key_env, allow_http=allow_http, official=spec.host)
        self.url = base + spec.path
        headers = {"Content-Type": "application/json"}
        if api == "anthropic":
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if key:
                headers["x-api-key"] = key
        elif key:
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers  # carries the key: never written anywhere
        self._send = retrying(post or (lambda u, h, b: _urllib_post(u, h, b, timeout)), retries=retries,
                              backoff=backoff)
        self.name = f"hosted:{api}:{self.model}@{public_url(base)}"
        self._image: tuple[object, tuple[str, str]] | None = None  # the last strip image, encoded

    def __repr__(self) -> str:
        return f"HostedJudge({self.name!r})"

    def _encoded(self, image) -> tuple[str, str]:
        if self._image is None or self._image[0] is not image:  # strips are judged 6+ times in a row
            self._image = (image, encode_image(image))
        return self._image[1]

    def complete(self, image, prompt: str) -> str:
        media_type, data = self._encoded(image)
        body = json.dumps(request_body(self.api, self.model, prompt, media_type, data, self.max_tokens)).encode()
        response = self._send(self.url, self._headers, body)
        try:
            return reply_text(self.api, response)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"unexpected reply from {public_url(self.url)} (not a {self.api} response): "
                             f"{str(response)[:200]}") from None

    def judge(self, answer: str, strip: Strip, target_panel: int) -> Verdict:
        _need_target(target_panel, strip.n_panels)
        early = _junk_without_asking(answer, target_panel)
        if early is not None:
            return early
        reply = self.complete(strip.image, judge_prompt(answer, strip.n_panels))
        panel, junk, reason = parse_reply(reply, strip.n_panels)
        short = " ".join(reply.split())[:80]
        why = ("junk" if junk else f"panel {panel}" if panel else "no single panel") + f": {reason or short}"
        return _verdict(panel, junk, target_panel, why, raw=reply)


# ---------------------------------------------------------------- a local VLM judge, scored by likelihood

class VLMJudge:
    """A local VLM judge (any family `gaze.load` supports), scored by next-token likelihood over the options.

    Build it with `VLMJudge.load(model_id_or_folder, device=..., dtype=...)` or `VLMJudge(loaded)` to reuse a
    loaded model (no steering is active while it judges). One forward pass per answer.
    """

    sees_image = True

    def __init__(self, loaded):
        self.loaded = loaded
        self.name = f"vlm:{loaded.model_id}"
        self._options: dict[int, tuple[list[int], list[int]]] = {}  # n panels -> (shared prefix ids, option ids)

    @classmethod
    def load(cls, model: str, *, device: str | None = None, dtype: str = "float32",
             device_map: str | None = None) -> "VLMJudge":
        from gaze.models import load

        return cls(load(model, device=device, dtype=dtype, device_map=device_map))

    def option_tokens(self, n_panels: int, prompt_text: str) -> tuple[list[int], list[int]]:
        """(ids shared by every option's tokenisation after the prompt, the first id that tells each option
        apart): options "1".."N" then "0". The shared ids (a word-start marker in some tokenizers) are appended
        to the prompt before scoring, so that each option is one next token."""
        if n_panels in self._options:
            return self._options[n_panels]
        if n_panels > 9:
            raise JudgeError(f"the likelihood judge scores one digit per panel: {n_panels} panels are too many")
        tok = getattr(self.loaded.processor, "tokenizer", self.loaded.processor)
        base = tok(prompt_text, add_special_tokens=False)["input_ids"]
        tails = []
        for option in [*map(str, range(1, n_panels + 1)), "0"]:
            ids = tok(prompt_text + option, add_special_tokens=False)["input_ids"]
            if ids[: len(base)] != base or len(ids) == len(base):
                raise JudgeError(f"the tokenizer of {self.loaded.model_id} merges the option {option!r} into the "
                                 "prompt: this model cannot be scored as a likelihood judge; use --judge hosted")
            tails.append(ids[len(base):])
        shared = 0
        while all(len(t) > shared + 1 for t in tails) and len({t[shared] for t in tails}) == 1:
            shared += 1
        firsts = [t[shared] for t in tails]
        if len(set(firsts)) != len(firsts) or any(t[:shared] != tails[0][:shared] for t in tails):
            raise JudgeError(f"the tokenizer of {self.loaded.model_id} does not give each digit its own token: "
                             "it cannot be scored as a likelihood judge; use --judge hosted")
        self._options[n_panels] = (tails[0][:shared], firsts)
        return self._options[n_panels]

    def scores(self, answer: str, strip: Strip) -> list[float]:
        """Probabilities of the options panels 1..N, then junk, renormalised over them (they sum to 1)."""
        import torch

        from gaze.generation import prepare_inputs
        from gaze.prompts import chat_text

        question = judge_prompt(answer, strip.n_panels, reply="digit")
        shared, options = self.option_tokens(strip.n_panels, chat_text(self.loaded.processor, question))
        inputs, _ = prepare_inputs(self.loaded, strip.image, question)
        inputs = dict(inputs)
        if shared:  # append the tokens every option starts with; per-token tensors grow with them
            ids = inputs["input_ids"]
            extra = torch.tensor([shared], dtype=ids.dtype, device=ids.device)  # [1, s]
            for k, v in list(inputs.items()):
                if isinstance(v, torch.Tensor) and v.shape == ids.shape:
                    fill = extra if k == "input_ids" else torch.full_like(extra, 1 if k == "attention_mask" else 0)
                    inputs[k] = torch.cat([v, fill.to(v.dtype)], dim=1)
        with torch.no_grad():
            logits = self.loaded.model(**inputs).logits[0, -1].float()  # [vocab]
        picked = torch.log_softmax(logits, -1)[torch.tensor(options, device=logits.device)]  # [N + 1]
        return torch.softmax(picked, -1).tolist()

    def judge(self, answer: str, strip: Strip, target_panel: int) -> Verdict:
        _need_target(target_panel, strip.n_panels)
        early = _junk_without_asking(answer, target_panel)
        if early is not None:
            return early
        p = self.scores(answer, strip)
        panels, junk_p = p[:-1], p[-1]
        best = max(range(len(panels)), key=panels.__getitem__) + 1
        junk = junk_p > panels[best - 1]
        shown = " ".join(f"{v:.2f}" for v in panels)
        why = (f"junk (p {junk_p:.2f} > best panel {best}, {panels[best - 1]:.2f})" if junk else
               f"panel {best} (p {panels[best - 1]:.2f}; panels {shown}; junk {junk_p:.2f})")
        return _verdict(None if junk else best, junk, target_panel, why, raw=str(0 if junk else best),
                        scores=tuple(p))


# ---------------------------------------------------------------- calibration

@dataclass(frozen=True)
class CalibrationItem:
    strip_id: str
    panel: int  # the panel the answer is known to describe
    answer: str


@dataclass(frozen=True)
class Calibration:
    """How a judge does on answers whose panel is known."""

    judge: str
    source: str  # captions | answers
    n_panels: int
    confusion: tuple[tuple[int, ...], ...]  # [true panel][picked panel 1..N, then no panel (junk / none)]
    junk: int  # answers flagged junk
    items_digest: str  # what was judged (strip ids, panels, answers)

    @property
    def n(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def accuracy(self) -> float:
        return sum(self.confusion[k][k] for k in range(self.n_panels)) / self.n if self.n else float("nan")

    def per_panel(self) -> dict[str, float | None]:
        """Accuracy on the answers about each panel."""
        return {str(k + 1): (row[k] / sum(row) if sum(row) else None) for k, row in enumerate(self.confusion)}

    def picked(self) -> dict[str, float]:
        """How often the judge picks each panel ("none": junk or no panel): its bias; sums to 1."""
        cols = [sum(row[j] for row in self.confusion) for j in range(self.n_panels + 1)]
        names = [*map(str, range(1, self.n_panels + 1)), "none"]
        return {name: c / self.n if self.n else 0.0 for name, c in zip(names, cols)}

    def check(self, min_accuracy: float | None, where: str = "") -> "Calibration":
        """Refuse the judge's verdicts when its calibration accuracy is below `min_accuracy`."""
        if min_accuracy is not None and not self.accuracy >= min_accuracy:
            raise JudgeError(f"the judge {self.judge} picked the right panel for {self.accuracy:.0%} of {self.n} "
                             f"calibration answers ({self.source}), below --judge-min-accuracy {min_accuracy:g}: its "
                             f"verdicts are refused. Use a stronger --judge-model{f', see {where}' if where else ''}, "
                             "or lower --judge-min-accuracy if you accept it")
        return self

    def summary(self) -> str:
        picks = " ".join(f"{k}:{v:.0%}" for k, v in self.picked().items())
        return (f"judge calibration ({self.judge}, {self.source}, {self.n} answers): {self.accuracy:.0%} right, "
                f"{self.junk} junk; picks {picks}")

    def to_dict(self) -> dict:
        return {"judge": self.judge, "source": self.source, "n_panels": self.n_panels, "n": self.n,
                "accuracy": self.accuracy, "per_panel": self.per_panel(), "picked": self.picked(), "junk": self.junk,
                "confusion": [list(r) for r in self.confusion], "items_digest": self.items_digest}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(d["judge"], d["source"], d["n_panels"], tuple(tuple(r) for r in d["confusion"]), d["junk"],
                   d["items_digest"])


def items_digest(items: Sequence[CalibrationItem]) -> str:
    from gaze.eval.records import content_digest

    return content_digest([[i.strip_id, i.panel, i.answer] for i in items])


def caption_items(strips: Sequence[Strip]) -> list[CalibrationItem]:
    """Each panel's ground-truth caption, as an answer known to describe that panel."""
    out = []
    for s in strips:
        if s.captions is None:
            raise JudgeError(f"strip {s.strip_id} has no captions to calibrate the judge on: use captioned strips, or "
                             "--judge-calibration answers (the model's own panel answers)")
        out += [CalibrationItem(s.strip_id, k, c) for k, c in enumerate(s.captions, start=1)]
    return out


def model_answers(loaded, strips: Sequence[Strip], max_new_tokens: int = 24) -> list[CalibrationItem]:
    """The evaluated model's own unsteered answers to its panel question ("What is happening in the k-th panel
    from the left?"), for every panel of every strip: answers about a known panel, in the model's own style."""
    from gaze.generation import generate
    from gaze.prompts import panel_question

    template = loaded.prompts.panel
    return [CalibrationItem(s.strip_id, k, generate(loaded, s.image, panel_question(k, template),
                                                    max_new_tokens=max_new_tokens).text)
            for s in strips for k in range(1, s.n_panels + 1)]


def calibrate(judge, items: Sequence[CalibrationItem], strips: Sequence[Strip], source: str) -> Calibration:
    """Judge every item against its known panel; the confusion of true vs picked panels."""
    by_id = {s.strip_id: s for s in strips}
    n = max(by_id[i.strip_id].n_panels for i in items)
    confusion = [[0] * (n + 1) for _ in range(n)]
    junk = 0
    for item in items:
        v = judge.judge(item.answer, by_id[item.strip_id], item.panel)
        confusion[item.panel - 1][n if v.matched_panel is None else v.matched_panel - 1] += 1
        junk += bool(v.junk)
    return Calibration(judge.name, source, n, tuple(map(tuple, confusion)), junk, items_digest(items))


def slug(name: str) -> str:
    """A judge's name as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "judge"


def _answer_items(out: Path, strips: Sequence[Strip], loaded, max_new_tokens: int) -> list[CalibrationItem]:
    """The model's own panel answers, generated once and kept in OUT/calibration_answers.json."""
    path = out / CALIBRATION_ANSWERS
    hashes = {s.strip_id: s.content_hash() for s in strips}
    if path.exists():
        saved = json.loads(path.read_text())
        if {k: saved["strip_hashes"].get(k) for k in hashes} == hashes:
            return [CalibrationItem(**i) for i in saved["items"] if i["strip_id"] in hashes]
    if loaded is None:
        raise JudgeError(f"{path} holds no answers for these strips, and re-judging runs without the evaluated model: "
                         "use --judge-calibration captions")
    items = model_answers(loaded, strips, max_new_tokens)
    path.write_text(json.dumps({"strip_hashes": hashes, "items": [vars(i) for i in items]}, indent=1))
    return items


def calibrate_for_run(cfg, judge, strips: Sequence[Strip], out: str | Path, loaded=None) -> Calibration | None:
    """Calibrate an image judge on the first `cfg.judge_calibration_strips` strips (reused from
    OUT/judges/NAME/calibration.json when the same answers were judged), save it, print it, and refuse the judge
    below `cfg.judge_min_accuracy`. None for judges that do not see the image, or `--judge-calibration none`."""
    if not getattr(judge, "sees_image", False) or cfg.judge_calibration == "none":
        return None
    out = Path(out)
    chosen = list(strips[: cfg.judge_calibration_strips])
    if cfg.judge_calibration == "captions":
        items = caption_items(chosen)
    elif cfg.judge_calibration == "answers":
        items = _answer_items(out, chosen, loaded, cfg.max_new_tokens)
    else:
        raise JudgeError(f"--judge-calibration is captions, answers or none, not {cfg.judge_calibration!r}")
    path = out / JUDGES_DIR / slug(judge.name) / CALIBRATION
    cal = None
    if path.exists():
        old = Calibration.from_dict(json.loads(path.read_text()))
        if (old.judge, old.source, old.items_digest) == (judge.name, cfg.judge_calibration, items_digest(items)):
            cal = old
    if cal is None:
        cal = calibrate(judge, items, chosen, cfg.judge_calibration)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cal.to_dict(), indent=1))
    print(cal.summary(), file=sys.stderr)
    return cal.check(cfg.judge_min_accuracy, str(path))


# ---------------------------------------------------------------- re-judging a run without its model

def projected(record: dict, name: str) -> dict:
    """`record` as judge `name` judged it (its verdict in `verdicts` as the record's matched / correct / why)."""
    v = record.get("verdicts", {}).get(name)
    if v is None or record["protocol"] not in PANEL_PROTOCOLS:
        return record
    return {**record, "matched": v["matched"], "correct": v["correct"], "why": v["why"], "judge": name}


def _merged_patch(model_id: str) -> int | None:
    """The token size strips were snapped to (processor only, no weights)."""
    from transformers import AutoConfig

    from gaze.families import family_of, register_image_only_processors
    from gaze.models import _load_processor, resolve

    register_image_only_processors()
    path = resolve(model_id)
    config = AutoConfig.from_pretrained(path)
    return family_of(config).merged_patch(_load_processor(path, config, None))


def rejudge(cfg, *, judge=None, progress: bool = True) -> dict:
    """Re-judge the vqa / narration / sweep answers of the run in `cfg.out` with the judge `cfg` names (or
    `judge`), without the evaluated model: its verdicts join each record's `verdicts` (records.jsonl is
    rewritten, resealed; the run's own verdicts stay its primary ones, so it still resumes), and the aggregate
    under this judge goes to OUT/judges/NAME/aggregate.json (dynamic and region records keep their caption-judge
    verdicts). Image judges are calibrated first, as in a run. Returns that aggregate."""
    from tqdm.auto import tqdm

    from gaze.eval.config import AGGREGATE, MANIFEST, RECORDS, EvalError
    from gaze.eval.judges import judge_for
    from gaze.eval.protocols import _finite, _json_default, aggregate, eval_strips
    from gaze.eval.records import RecordLog, run_identity

    out = Path(cfg.out)
    for name in (RECORDS, MANIFEST, AGGREGATE):
        if not (out / name).exists():
            raise EvalError(f"{out} holds no finished evaluation ({name} is missing): run `gaze eval --out {out}` "
                            "first; --rejudge re-judges its records")
    meta = json.loads((out / AGGREGATE).read_text())["meta"]
    run = meta["config"]
    log = RecordLog(out / RECORDS, identity=run_identity(json.loads((out / MANIFEST).read_text())))
    for line in log.report():
        print(line.replace("recomputing it", "left out (rerun the eval to recompute it)"), file=sys.stderr)
    paper = run["strips"].startswith("procedural:") and run.get("assembly", "paper") == "paper"
    align = None if paper else _merged_patch(run["model"])
    strips = eval_strips(run["strips"], run["n_strips"], align=align, panel_size=run["panel_size"],
                         assembly=run.get("assembly", "paper"))
    by_id = {s.strip_id: s for s in strips}
    todo = [r for r in log.records.values() if r["protocol"] in PANEL_PROTOCOLS]
    for r in todo:
        s = by_id.get(r["strip_id"])
        if s is None or s.content_hash() != r.get("strip_hash"):
            raise EvalError(f"strip {r['strip_id']} of {out / RECORDS} is not what {run['strips']} gives now "
                            "(missing, or other pixels): re-judging needs the very strips the answers came from")
    from gaze.models import default_device

    judge = judge or judge_for(cfg, cfg.device or default_device())
    calibration = calibrate_for_run(cfg, judge, strips, out)
    updated = {}
    for r in tqdm(todo, desc="rejudge", unit="answer", disable=not progress, file=sys.stderr):
        if r["degenerate"]:
            v = Verdict(None, False, "degenerate generation")
        else:
            v = judge.judge(r["answer"], by_id[r["strip_id"]], int(r["target"]))
        updated[r["key"]] = {**r, "verdicts": {**r.get("verdicts", {}), judge.name: v.to_record()}}
    log.rewrite(updated)
    agg = aggregate([projected(r, judge.name) for r in log.records.values()], n_boot=run["n_boot"],
                    seed=run["seed"], meta={**meta, "judge": judge.name, "rejudged_from": meta.get("judge"),
                                            "rejudged_protocols": list(PANEL_PROTOCOLS),
                                            "judge_calibration": calibration.to_dict() if calibration else None})
    folder = out / JUDGES_DIR / slug(judge.name)
    folder.mkdir(parents=True, exist_ok=True)
    agg = _finite(agg)
    (folder / AGGREGATE).write_text(json.dumps(agg, indent=1, default=_json_default))
    return agg
