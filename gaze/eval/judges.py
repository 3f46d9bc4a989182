"""Judges: which panel does an answer describe? Offline by default, honest about misses.

    verdict = CaptionJudge().judge("the cat jumps by a tree", strip, target_panel=3)
    verdict.matched_panel, verdict.correct, verdict.why

Every judge implements `judge(answer, strip, target_panel) -> Verdict` (panels
1-based). An answer counts as correct only when the judge can name ONE panel
and it is the target: an empty or degenerate answer, an answer that matches no
panel, or one that matches two panels equally (ambiguous) is a miss.

    LetterJudge     exact: the strip has a distinct letter overlaid on each panel;
                    the answer must name exactly one of them.
    CaptionJudge    deterministic text matching against the six panel captions:
                    stemmed content words, weighted by how specific they are to
                    one caption, best caption must be clearly ahead of the next.
    EmbeddingJudge  cosine similarity of sentence embeddings (sentence-transformers
                    or any transformers encoder already on disk); optional.
    LLMJudge        asks a chat model which caption the answer describes: any
                    OpenAI-compatible endpoint (key from the environment) or a
                    local transformers chat model; optional, never required.
    VLMJudge        sees the strip image, as the paper's judge does: forced choice of
    HostedJudge     the panel (1..N) the answer describes, plus a junk flag; a local
                    VLM scored by next-token likelihood, or a hosted one (OpenAI
                    chat completions or Anthropic messages). In `gaze.eval.image_judges`,
                    with their calibration and `rejudge`.

Candidate-based judges (caption, embedding, LLM) also judge object regions: a
scene is a `Strip` whose "panels" are object boxes and whose captions are the
object labels (`evaluation.scene_strip`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from gaze.errors import GazeError
from gaze.strips import Strip

DEGENERATE_REPETITION = 0.5  # share of repeated word 3-grams above which an answer is a loop (as gaze.generation)


class JudgeError(GazeError):
    """A judge that cannot run on this input or machine; the message says how to fix it."""


@dataclass(frozen=True)
class Verdict:
    """What a judge decided about one answer."""

    matched_panel: int | None  # 1-based panel the answer describes; None: empty, degenerate, unmatched or ambiguous
    correct: bool  # matched_panel == target panel
    why: str  # one line a reader can check
    junk: bool = False  # an image judge flagged the answer as degenerate or irrelevant (then matched_panel is None)
    raw: str | None = None  # the judge's raw reply, kept so a run can be audited and re-judged
    scores: tuple[float, ...] | None = None  # a likelihood judge's probability of each option (panels 1..N, then junk)

    def to_record(self) -> dict:
        """The verdict as stored in an eval record's `verdicts` (plain JSON)."""
        out = {"matched": self.matched_panel, "correct": bool(self.correct), "why": self.why, "junk": bool(self.junk)}
        if self.raw is not None:
            out["raw"] = self.raw
        if self.scores is not None:
            out["scores"] = [round(float(v), 6) for v in self.scores]
        return out


class Judge(Protocol):
    name: str

    def judge(self, answer: str, strip: Strip, target_panel: int) -> Verdict: ...


def _verdict(matched: int | None, target: int, why: str) -> Verdict:
    return Verdict(matched, matched is not None and matched == target, why)


# ---------------------------------------------------------------- text normalisation

STOP_WORDS = frozenset(
    """a an the this that these those it its it's there here is are was were be been being am do does did has have
    had having by of in on at to from with without into onto over under near next beside and or but so as than then
    very just also too not no some any all each both more most other another such own same can could will would
    shall should may might must i you he she we they me him her us them my your his our their what which who whom
    whose when where why how while if about up down out off again once only panel panels comic strip image picture
    scene frame shows showing show shown depicts depicting depicted see seen looks looking appears there's main
    action happening happens happen answer briefly left right first second third fourth fifth sixth""".split()
)
IRREGULAR = {"ate": "eat", "eaten": "eat", "sat": "sit", "ran": "run", "fell": "fall", "fallen": "fall",
             "sang": "sing", "sung": "sing", "slept": "sleep", "flew": "fly", "swam": "swim", "children": "child",
             "men": "man", "women": "woman", "mice": "mouse", "geese": "goose", "feet": "foot", "teeth": "tooth"}
_WORD = re.compile(r"[a-z]+")


def stem(word: str) -> str:
    """A light English stemmer: jumps/jumping/jumped -> jump, cries/cried -> cry, houses -> house."""
    w = IRREGULAR.get(word, word)
    if len(w) > 4 and w.endswith(("ies", "ied")):
        return w[:-3] + "y"
    for suffix in ("ing", "ed"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            if len(w) >= 4 and w[-1] == w[-2] and w[-1] not in "lsz":  # running -> runn -> run
                w = w[:-1]
            return w
    if w.endswith("es") and w[:-2].endswith(("ss", "x", "z", "ch", "sh")):
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        return w[:-1]
    return w


def content_words(text: str) -> list[str]:
    """Lower-cased, stemmed words of `text` without stop words, digits or punctuation, in order."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


def degenerate_reason(answer: str) -> str | None:
    """Why an answer cannot be judged (empty, no words, a repetition loop), or None when it can."""
    text = answer.strip()
    if not text:
        return "empty answer"
    if not re.search(r"[A-Za-z0-9]", text):
        return "no words in the answer"
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if len(grams) >= 4 and 1 - len(set(grams)) / len(grams) > DEGENERATE_REPETITION:
        return "degenerate answer (a repetition loop)"
    return None


def _need_target(target: int, n: int) -> None:
    if not 1 <= target <= n:
        raise JudgeError(f"target panel {target} is out of range: this strip has panels 1..{n}")


# ---------------------------------------------------------------- letter judge

_LETTER_PHRASE = re.compile(r"\bletter\s+(?:is\s+)?[\"'“‘(]?([A-Za-z])\b[\"'”’)]?", re.IGNORECASE)


@dataclass(frozen=True)
class LetterJudge:
    """Exact: which of the strip's overlaid letters does the answer name?

    Accepted forms: the answer is one letter ("K", "k.", "'K'"), a phrase
    "letter K" / "the letter is k", or stand-alone capital letters ("It is K").
    The capitals "A" and "I" followed by a lower-case word are read as an
    article / pronoun, not a letter. Naming letters of two panels is ambiguous.
    """

    name: str = "letter"

    def judge(self, answer: str, strip: Strip, target_panel: int) -> Verdict:
        if strip.letters is None:
            raise JudgeError(f"strip {strip.strip_id!r} has no letters: generate strips with letter overlays "
                             "(datagen make_strip(letters=True)) or use --judge caption")
        _need_target(target_panel, strip.n_panels)
        bad = degenerate_reason(answer)
        if bad:
            return _verdict(None, target_panel, bad)
        letters = [l.upper() for l in strip.letters]
        named = self.named_letters(answer)
        panels = sorted({k + 1 for k, l in enumerate(letters) if l in named})
        if not panels:
            return _verdict(None, target_panel, f"names no letter of this strip ({''.join(letters)}): {sorted(named)}")
        if len(panels) > 1:
            return _verdict(None, target_panel, f"ambiguous: names letters of panels {panels}")
        return _verdict(panels[0], target_panel, f"names letter {letters[panels[0] - 1]} of panel {panels[0]}")

    @staticmethod
    def named_letters(answer: str) -> set[str]:
        """Upper-case letters the answer names."""
        bare = re.sub(r"[^A-Za-z]", "", answer)
        if len(bare) == 1:
            return {bare.upper()}
        phrase = {m.upper() for m in _LETTER_PHRASE.findall(answer)}
        if phrase:
            return phrase
        named = set()
        for m in re.finditer(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", answer):
            rest = answer[m.end():]
            if m.group(1) in "AI" and re.match(r"\s+[a-z]", rest):
                continue  # "A cat", "I see": an article or a pronoun
            named.add(m.group(1))
        return named


# ---------------------------------------------------------------- candidate-based judges

class CandidateJudge:
    """Shared plumbing: check the answer, pick one of the strip's captions, compare with the target."""

    name = "candidate"

    def match(self, answer: str, candidates: Sequence[str]) -> tuple[int | None, str]:
        """(0-based index of the candidate the answer describes, or None; why)."""
        raise NotImplementedError

    def judge(self, answer: str, strip: Strip, target_panel: int) -> Verdict:
        if strip.captions is None:
            raise JudgeError(f"strip {strip.strip_id!r} has no captions: use strips with one caption per panel "
                             "(datagen, or captions.json beside p1..p6), or --judge letter")
        _need_target(target_panel, strip.n_panels)
        bad = degenerate_reason(answer)
        if bad:
            return _verdict(None, target_panel, bad)
        index, why = self.match(answer, strip.captions)
        return _verdict(None if index is None else index + 1, target_panel, why)


def _pick(scores: Sequence[float], min_score: float, margin: float) -> tuple[int | None, str]:
    """The best-scoring candidate if it reaches `min_score` and leads the runner-up by `margin`."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    best = order[0]
    second = scores[order[1]] if len(order) > 1 else 0.0
    shown = " ".join(f"{s:.2f}" for s in scores)
    if scores[best] < min_score:
        return None, f"matches no panel (best {scores[best]:.2f} < {min_score}; scores {shown})"
    if scores[best] - second < margin:
        tied = [i + 1 for i in order if scores[best] - scores[i] < margin]
        return None, f"ambiguous: panels {sorted(tied)} match about equally (scores {shown})"
    return best, f"matches panel {best + 1} (scores {shown})"


@dataclass(frozen=True)
class CaptionJudge(CandidateJudge):
    """Deterministic caption matching.

    Each caption's score is the share of its content words that the answer
    contains, each word weighted by log(N / number of captions holding it): a
    word every caption shares (the recurring character) weighs nothing, a word
    only one caption has weighs most. The best caption wins if it scores at
    least `min_score` and leads the runner-up by `margin`; otherwise the answer
    is unmatched or ambiguous, a miss either way.
    """

    min_score: float = 0.5  # the answer must hold at least this (weighted) share of the caption's words
    margin: float = 0.25  # and lead the next caption by this much
    name: str = "caption"

    def scores(self, answer: str, candidates: Sequence[str]) -> list[float]:
        said = set(content_words(answer))
        words = [set(content_words(c)) for c in candidates]
        n = len(candidates)
        df: dict[str, int] = {}
        for ws in words:
            for w in ws:
                df[w] = df.get(w, 0) + 1
        weight = {w: (math.log(n / d) if n > 1 else 1.0) for w, d in df.items()}
        out = []
        for ws in words:
            total = sum(weight[w] for w in ws)
            out.append(sum(weight[w] for w in ws & said) / total if total > 0 else 0.0)
        return out

    def match(self, answer: str, candidates: Sequence[str]) -> tuple[int | None, str]:
        return _pick(self.scores(answer, candidates), self.min_score, self.margin)


class EmbeddingJudge(CandidateJudge):
    """Cosine similarity of sentence embeddings; the best caption must lead by `margin`.

    `model`: a sentence-transformers model or any transformers encoder (mean
    pooled), loaded with `local_files_only=True`: nothing is downloaded. Or
    pass `encode` (list of texts -> [n, d] vectors) directly.
    """

    name = "embedding"

    def __init__(self, model: str | None = None, *, encode: Callable[[list[str]], "object"] | None = None,
                 min_similarity: float = 0.3, margin: float = 0.05, device: str = "cpu"):
        if (model is None) == (encode is None):
            raise JudgeError("EmbeddingJudge needs a model (name or local folder) or an `encode` function")
        self.model_id = model or getattr(encode, "__name__", "encode")
        self.min_similarity, self.margin = min_similarity, margin
        self._encode = encode or _load_encoder(model, device)

    def scores(self, answer: str, candidates: Sequence[str]) -> list[float]:
        import numpy as np

        v = np.asarray(self._encode([answer, *candidates]), dtype=np.float64)  # [1 + N, d]
        v = v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
        return [float(x) for x in v[1:] @ v[0]]

    def match(self, answer: str, candidates: Sequence[str]) -> tuple[int | None, str]:
        return _pick(self.scores(answer, candidates), self.min_similarity, self.margin)


def _load_encoder(model: str, device: str) -> Callable[[list[str]], object]:
    hint = (f"cannot load the embedding model {model!r} offline: copy it to a local folder and pass its path "
            "(--judge-model), or use --judge caption")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        try:
            st = SentenceTransformer(model, device=device, local_files_only=True)
        except Exception as e:  # noqa: BLE001  (any loading failure gets the same prescription)
            raise JudgeError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return lambda texts: st.encode(list(texts), convert_to_numpy=True)
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
        enc = AutoModel.from_pretrained(model, local_files_only=True).to(device).eval()
    except Exception as e:  # noqa: BLE001
        raise JudgeError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    @torch.no_grad()
    def encode(texts):
        batch = tok(list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
        hidden = enc(**batch).last_hidden_state  # [n, S, d]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [n, S, 1]
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float().cpu().numpy()  # [n, d] mean-pooled

    return encode


# ---------------------------------------------------------------- LLM judge

LLM_SYSTEM = ("You grade answers about images. You are given numbered descriptions of image parts and one answer. "
              "Reply with the number of the single description the answer is about. Reply 0 if it matches none, "
              "describes several equally, or is gibberish. Reply with the number only.")


def build_llm_messages(answer: str, candidates: Sequence[str]) -> list[dict]:
    """The chat messages the LLM judge sends: a system rule, the numbered captions, the answer."""
    listing = "\n".join(f"{k}. {c}" for k, c in enumerate(candidates, start=1))
    user = (f"Descriptions:\n{listing}\n\nAnswer:\n\"\"\"{answer.strip()}\"\"\"\n\n"
            f"Which description (1-{len(candidates)}, or 0)?")
    return [{"role": "system", "content": LLM_SYSTEM}, {"role": "user", "content": user}]


def parse_llm_reply(reply: str, n: int) -> int | None:
    """The 1-based candidate an LLM reply names, or None (0, 'none', out of range, or no number)."""
    m = re.search(r"-?\d+", reply or "")
    if m is None:
        return None
    k = int(m.group())
    return k if 1 <= k <= n else None


Post = Callable[[str, dict, bytes], dict]  # (url, headers, body) -> decoded JSON response
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def public_url(url: str) -> str:
    """`url` without credentials or query (scheme://host[:port]/path): what may be shown or written to disk."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _no_redirects():
    """A urllib opener that refuses redirects: a redirect would carry the Authorization header elsewhere."""
    import urllib.request

    class Refuse(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None  # urllib then raises HTTPError for the 3xx

    return urllib.request.build_opener(Refuse)


class TransientJudgeError(JudgeError):
    """A hosted judge's failure worth retrying: HTTP 429, a 5xx, or a timeout."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After), if it said


def _retry_after(headers) -> float | None:
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError, AttributeError):
        return None  # absent, or an HTTP date: the backoff decides


def _urllib_post(url: str, headers: dict, body: bytes, timeout: float = 60.0) -> dict:
    import socket
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    shown = public_url(url)
    try:
        with _no_redirects().open(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise JudgeError(f"LLM judge endpoint {shown} answered a redirect (HTTP {e.code}), which is not followed "
                             "(it would carry the API key elsewhere): give --judge-endpoint the final URL") from None
        detail = e.read()[:200]
        if e.code == 429 or e.code >= 500:
            raise TransientJudgeError(f"LLM judge endpoint {shown} answered HTTP {e.code}: {detail!r}",
                                      _retry_after(e.headers)) from None
        raise JudgeError(f"LLM judge endpoint {shown} answered HTTP {e.code}: {detail!r}") from None
    except (TimeoutError, socket.timeout) as e:
        raise TransientJudgeError(f"LLM judge endpoint {shown} timed out after {timeout:g} s ({e})") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise TransientJudgeError(f"LLM judge endpoint {shown} timed out after {timeout:g} s") from None
        raise JudgeError(f"cannot reach the LLM judge endpoint {shown} ({e.reason}): check --judge-endpoint, "
                         "or use --judge caption (offline)") from None


def retrying(post: Post, *, retries: int = 5, backoff: float = 1.0, max_wait: float = 60.0,
             sleep: Callable[[float], None] | None = None) -> Post:
    """`post` retried on `TransientJudgeError` (429, 5xx, timeouts): waits backoff * 2**attempt seconds (or the
    server's Retry-After, if longer; at most `max_wait`) between at most `retries` further tries."""
    import time

    wait = sleep or time.sleep

    def send(url: str, headers: dict, body: bytes) -> dict:
        for attempt in range(retries + 1):
            try:
                return post(url, headers, body)
            except TransientJudgeError as e:
                if attempt == retries:
                    raise JudgeError(f"{e} (gave up after {retries + 1} tries: try again later, or raise "
                                     "--judge-retries)") from None
                wait(min(max_wait, max(backoff * 2 ** attempt, e.retry_after or 0.0)))
        raise AssertionError("unreachable")

    return send


def checked_endpoint(base: str, key: str | None, api_key_env: str, *, allow_http: bool = False,
                     official: str | None = None) -> str:
    """`base` (a judge's endpoint URL), refused unless it is http(s); unless the key would go only over https or
    to a loopback server (`allow_http` lifts that); and, for the `official` host, unless a key is set."""
    from urllib.parse import urlsplit

    parts = urlsplit(base)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise JudgeError(f"--judge-endpoint {public_url(base)!r} is not an http(s) URL: give e.g. "
                         "https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    if key is None and official and parts.hostname == official:
        raise JudgeError(f"the LLM judge on {public_url(base)} needs an API key in ${api_key_env}: set it, point "
                         "--judge-endpoint at a local server, or use --judge caption (offline, the default)")
    if key and parts.scheme != "https" and parts.hostname not in LOOPBACK and not allow_http:
        raise JudgeError(f"refusing to send the API key in ${api_key_env} over plain http to {public_url(base)}: "
                         "use an https endpoint, a loopback server, or --judge-allow-http if you mean it")
    return base


class LLMJudge(CandidateJudge):
    """Asks a chat model which caption an answer describes.

    Build it with `LLMJudge.openai(...)` (any OpenAI-compatible endpoint, key
    from an environment variable), `LLMJudge.local(folder)` (a transformers chat
    model on disk), or `LLMJudge(complete)` with your own messages -> reply
    function. Replies that name no single caption count as misses.
    """

    name = "llm"

    def __init__(self, complete: Callable[[list[dict]], str], model_id: str = "custom"):
        self.complete, self.model_id = complete, model_id

    def match(self, answer: str, candidates: Sequence[str]) -> tuple[int | None, str]:
        reply = self.complete(build_llm_messages(answer, candidates))
        k = parse_llm_reply(reply, len(candidates))
        short = " ".join(str(reply).split())[:60]
        return (None, f"LLM judge matched no single panel (reply {short!r})") if k is None else (
            k - 1, f"LLM judge: panel {k} (reply {short!r})")

    @classmethod
    def openai(cls, model: str, *, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
               post: Post | None = None, timeout: float = 60.0, allow_http: bool = False,
               retries: int = 5) -> "LLMJudge":
        """A judge on an OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, llama.cpp, Ollama ...).

        The key is read from `api_key_env` (never from a flag or a file) and is
        sent only over https, or to a loopback server, unless `allow_http`;
        redirects are not followed; the endpoint is shown and recorded without
        credentials or query (`public_url`). A local endpoint may need no key.
        `post` replaces the HTTP call (tests); HTTP 429, 5xx and timeouts are retried with exponential backoff.
        """
        base = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        key = os.environ.get(api_key_env)
        checked_endpoint(base, key, api_key_env, allow_http=allow_http, official="api.openai.com")
        url = base + "/chat/completions"
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        send = post or retrying(lambda u, h, b: _urllib_post(u, h, b, timeout), retries=retries)

        def complete(messages: list[dict]) -> str:
            body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": 8}).encode()
            data = send(url, headers, body)
            try:
                return str(data["choices"][0]["message"]["content"])
            except (KeyError, IndexError, TypeError):
                raise JudgeError(f"unexpected reply from {public_url(url)}: {str(data)[:200]}") from None

        return cls(complete, model_id=f"{model}@{public_url(base)}")

    @classmethod
    def local(cls, model: str, *, device: str = "cpu", max_new_tokens: int = 8) -> "LLMJudge":
        """A judge on a transformers chat model already on disk (folder or cached id; nothing is downloaded)."""
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
            lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=True).to(device).eval()
        except Exception as e:  # noqa: BLE001
            raise JudgeError(f"cannot load the local judge model {model!r} offline ({type(e).__name__}): pass a "
                             "local folder with a chat template, or use --judge caption") from None

        @torch.no_grad()
        def complete(messages: list[dict]) -> str:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True).to(device)
            out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id or tok.eos_token_id)
            return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

        return cls(complete, model_id=model)


# ---------------------------------------------------------------- by name

JUDGES = ("caption", "letter", "embedding", "llm", "vlm", "hosted")


def make_judge(name: str, *, model: str | None = None, endpoint: str | None = None,
               api_key_env: str | None = None, device: str = "cpu", allow_http: bool = False,
               api: str = "openai", dtype: str = "float32", retries: int = 5) -> Judge:
    """A judge from its CLI name. `model`: embedding model, LLM (endpoint model name or local folder), or for the
    image judges the VLM (`vlm`: hub id or folder, loaded with `gaze.load`; `hosted`: the API's model name).
    `api`: the hosted judge's wire format, openai or anthropic; `api_key_env`: the environment variable holding
    its key (default OPENAI_API_KEY / ANTHROPIC_API_KEY)."""
    if name == "caption":
        return CaptionJudge()
    if name == "letter":
        return LetterJudge()
    if name == "embedding":
        return EmbeddingJudge(model or "sentence-transformers/all-MiniLM-L6-v2", device=device)
    if name == "llm":
        key_env = api_key_env or "OPENAI_API_KEY"
        if endpoint:
            return LLMJudge.openai(model or "gpt-4o-mini", base_url=endpoint, api_key_env=key_env,
                                   allow_http=allow_http, retries=retries)
        if model:
            return LLMJudge.local(model, device=device)
        return LLMJudge.openai("gpt-4o-mini", api_key_env=key_env, retries=retries)
    if name in ("vlm", "hosted"):
        from gaze.eval.image_judges import HostedJudge, VLMJudge

        if name == "vlm":
            if not model:
                raise JudgeError("--judge vlm needs --judge-model: a VLM hub id (e.g. Qwen/Qwen3-VL-8B-Instruct) or "
                                 "local folder, any family gaze supports")
            return VLMJudge.load(model, device=device, dtype=dtype)
        return HostedJudge(api, model, base_url=endpoint, api_key_env=api_key_env, allow_http=allow_http,
                           retries=retries)
    raise JudgeError(f"unknown judge {name!r}; use one of {', '.join(JUDGES)}")


def judge_for(cfg, device: str) -> Judge:
    """The judge an `EvalConfig` asks for, on `device`."""
    return make_judge(cfg.judge, model=cfg.judge_model, endpoint=cfg.judge_endpoint, api_key_env=cfg.judge_key_env,
                      device=device, allow_http=cfg.judge_allow_http, api=cfg.judge_api, dtype=cfg.dtype,
                      retries=cfg.judge_retries)
