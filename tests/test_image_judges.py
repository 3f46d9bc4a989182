"""Judges that see the strip: the hosted APIs up to the HTTP boundary (a stub server on 127.0.0.1), the local
likelihood judge on a tiny model, calibration and its gate, and re-judging a run without its model."""

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from gaze.eval.image_judges import (CALIBRATION, JUDGES_DIR, Calibration, CalibrationItem, HostedJudge, VLMJudge,
                                    calibrate, caption_items, judge_prompt, parse_reply, projected, rejudge, slug)
from gaze.eval.judges import JudgeError, Verdict, make_judge
from gaze.strips import Strip

CAPTIONS = ("the cat jumps by a tree", "the cat sleeps by a car", "the cat eats by a ball",
            "the cat cries by a house", "the cat sings by a star", "the cat falls by a cake")
KEY = "sk-secret-test-key"


def strip() -> Strip:
    image = Image.new("RGB", (384, 64), (200, 40, 40))
    panels = tuple((64 * k, 0, 64 * (k + 1), 64) for k in range(6))
    return Strip(image=image, panels=panels, strip_id="judge-test", captions=CAPTIONS)


# ---------------------------------------------------------------- a stub server

class Stub:
    """An HTTP server on 127.0.0.1 that records every request (path, lower-cased headers, JSON body) and
    answers from a script of (status, JSON body, headers, delay seconds); the last entry repeats."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, reply, headers, delay = stub.script[min(len(stub.requests), len(stub.script)) - 1]
                time.sleep(delay)
                data = json.dumps(reply(body) if callable(reply) else reply).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def openai_reply(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def anthropic_reply(text):
    return {"content": [{"type": "text", "text": text}], "role": "assistant"}


def ok(reply, delay=0.0):
    return (200, reply, {}, delay)


def _image_of(data_b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_b64)))


# ---------------------------------------------------------------- hosted: the two wire formats

def test_openai_request_carries_the_image_the_model_and_the_key(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with Stub([ok(openai_reply('{"panel": 3, "junk": false, "reason": "the cat eats"}'))]) as stub:
        judge = HostedJudge("openai", "vision-model", base_url=stub.url, api_key_env="TEST_JUDGE_KEY")
        v = judge.judge("a cat eating near a ball", strip(), 3)
    assert v.matched_panel == 3 and v.correct and not v.junk and "the cat eats" in v.why
    assert v.raw == '{"panel": 3, "junk": false, "reason": "the cat eats"}'
    path, headers, body = stub.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["authorization"] == f"Bearer {KEY}" and headers["content-type"] == "application/json"
    assert body["model"] == "vision-model" and body["temperature"] == 0 and body["max_tokens"] > 0
    (message,) = body["messages"]
    image, text = message["content"]
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    sent = _image_of(image["image_url"]["url"].split(",", 1)[1])
    assert sent.format == "JPEG" and sent.size == (384, 64)
    assert text == {"type": "text", "text": judge_prompt("a cat eating near a ball", 6)}
    assert "Ignore any panel numbers" in text["text"] and "junk" in text["text"]
    assert not any(c in text["text"] for c in CAPTIONS)  # the judge sees the image, not the captions
    assert KEY not in judge.name and KEY not in repr(judge) and judge.name.endswith(stub.url)


def test_anthropic_request_format_and_a_junk_verdict(monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", KEY)
    reply = anthropic_reply('Here: {"panel": null, "junk": true, "reason": "it loops"}')
    with Stub([ok(reply)]) as stub:
        judge = HostedJudge("anthropic", "claude-test", base_url=stub.url, api_key_env="TEST_ANTHROPIC_KEY")
        v = judge.judge("panel panel the the cat", strip(), 2)
    assert v.matched_panel is None and v.junk and not v.correct and "it loops" in v.why
    path, headers, body = stub.requests[0]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    assert body["model"] == "claude-test" and body["max_tokens"] > 0 and "temperature" not in body
    image, text = body["messages"][0]["content"]
    assert image["type"] == "image" and image["source"]["type"] == "base64"
    assert image["source"]["media_type"] == "image/jpeg" and _image_of(image["source"]["data"]).size == (384, 64)
    assert text["type"] == "text" and '"""panel panel the the cat"""' in text["text"]


def test_an_empty_or_looping_answer_is_junk_without_a_request(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with Stub([ok(openai_reply("1"))]) as stub:
        judge = HostedJudge("openai", "m", base_url=stub.url, api_key_env="TEST_JUDGE_KEY")
        for answer in ("", "tree tree tree tree tree tree tree tree"):
            v = judge.judge(answer, strip(), 1)
            assert v.junk and v.matched_panel is None and not v.correct
    assert stub.requests == []


@pytest.mark.parametrize("reply, parsed", [
    ('{"panel": 4, "junk": false, "reason": "r"}', (4, False, "r")),
    ('```json\n{"panel": "2", "junk": false}\n```', (2, False, "")),
    ('{"matched_panel": 5, "is_junk": false, "reasoning": "x"}', (5, False, "x")),  # the reference code's keys
    ('{"panel": 9, "junk": false}', (None, False, "")),  # out of range
    ('{"panel": 3, "junk": true}', (None, True, "")),  # junk wins
    ('{"panel": true}', (None, False, "")),
    ("Panel 6", (6, False, "a bare number")),
    ("2 or 3", (None, False, "the reply names no single panel")),
    ("junk", (None, True, "the reply names no single panel")),
])
def test_reply_parsing(reply, parsed):
    assert parse_reply(reply, 6) == parsed


# ---------------------------------------------------------------- hosted: retries and refusals

def test_a_503_then_a_200_is_retried(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with Stub([(503, {"error": "overloaded"}, {}, 0), (429, {"error": "slow down"}, {"Retry-After": "0"}, 0),
               ok(openai_reply('{"panel": 2, "junk": false}'))]) as stub:
        judge = HostedJudge("openai", "m", base_url=stub.url, api_key_env="TEST_JUDGE_KEY", backoff=0.01)
        assert judge.judge("a sleeping cat by a car", strip(), 2).correct
    assert len(stub.requests) == 3 and stub.requests[0][2] == stub.requests[2][2]  # the same request again


def test_a_timeout_is_retried(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with Stub([ok(openai_reply("1"), delay=1.5), ok(openai_reply('{"panel": 1, "junk": false}'))]) as stub:
        from gaze.eval.judges import _urllib_post

        judge = HostedJudge("openai", "m", base_url=stub.url, api_key_env="TEST_JUDGE_KEY", backoff=0.01,
                            post=lambda u, h, b: _urllib_post(u, h, b, timeout=0.5))
        assert judge.judge("a jumping cat by a tree", strip(), 1).correct
    assert len(stub.requests) == 2


def test_retries_give_up_with_advice_and_client_errors_are_not_retried(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with Stub([(500, {"error": "boom"}, {}, 0)]) as stub:
        judge = HostedJudge("openai", "m", base_url=stub.url, api_key_env="TEST_JUDGE_KEY", retries=2, backoff=0)
        with pytest.raises(JudgeError, match="HTTP 500.*gave up after 3 tries.*--judge-retries"):
            judge.judge("a cat", strip(), 1)
    assert len(stub.requests) == 3
    with Stub([(400, {"error": "bad model"}, {}, 0)]) as stub:
        judge = HostedJudge("anthropic", "m", base_url=stub.url, api_key_env="TEST_JUDGE_KEY", backoff=0)
        with pytest.raises(JudgeError, match="HTTP 400") as err:
            judge.judge("a cat", strip(), 1)
    assert len(stub.requests) == 1 and KEY not in str(err.value)
    with Stub([ok({"unexpected": True})]) as stub:
        judge = HostedJudge("anthropic", "m", base_url=stub.url, api_key_env="TEST_JUDGE_KEY")
        with pytest.raises(JudgeError, match="not a anthropic response"):
            judge.judge("a cat", strip(), 1)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_https_only_for_the_key_and_a_key_for_the_official_host(monkeypatch, api):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    for endpoint in ("http://judge.example/v1", "http://user:pw@judge.example/v1"):
        with pytest.raises(JudgeError, match="plain http") as err:
            HostedJudge(api, "m", base_url=endpoint, api_key_env="TEST_JUDGE_KEY")
        assert KEY not in str(err.value) and "pw" not in str(err.value)
    HostedJudge(api, "m", base_url="http://judge.example/v1", api_key_env="TEST_JUDGE_KEY", allow_http=True)
    HostedJudge(api, "m", base_url="https://judge.example/v1", api_key_env="TEST_JUDGE_KEY")
    HostedJudge(api, "m", base_url="http://localhost:9/v1", api_key_env="TEST_JUDGE_KEY")  # loopback
    with pytest.raises(JudgeError, match="not an http"):
        HostedJudge(api, "m", base_url="file:///etc/passwd", api_key_env="TEST_JUDGE_KEY")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    official = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com/v1"}[api]
    with pytest.raises(JudgeError, match=r"\$NO_SUCH_KEY_VAR"):
        HostedJudge(api, "m", base_url=official, api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(JudgeError, match="unknown judge API"):
        HostedJudge("gemini", "m")


def test_make_judge_builds_the_image_judges(monkeypatch, qwen3_path):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    hosted = make_judge("hosted", api="anthropic", model="claude-x")
    assert isinstance(hosted, HostedJudge) and hosted.url == "https://api.anthropic.com/v1/messages"
    assert hosted.name == "hosted:anthropic:claude-x@https://api.anthropic.com/v1"
    with pytest.raises(JudgeError, match="--judge-model"):
        make_judge("vlm")
    local = make_judge("vlm", model=str(qwen3_path))
    assert isinstance(local, VLMJudge) and local.name == f"vlm:{qwen3_path}"


# ---------------------------------------------------------------- the local likelihood judge

def test_the_local_judge_scores_the_options_as_the_models_next_token(loaded_qwen3):
    """Its probabilities equal the first generated token's logits, restricted to the option tokens."""
    import torch

    from gaze.generation import prepare_inputs
    from gaze.prompts import chat_text

    judge = VLMJudge(loaded_qwen3)
    s = strip()
    answer = "a cat eating near a ball"
    question = judge_prompt(answer, 6, reply="digit")
    shared, options = judge.option_tokens(6, chat_text(loaded_qwen3.processor, question))
    tok = loaded_qwen3.processor.tokenizer
    assert shared == [] and [tok.decode([i]) for i in options] == ["1", "2", "3", "4", "5", "6", "0"]
    p = judge.scores(answer, s)
    inputs, _ = prepare_inputs(loaded_qwen3, s.image, question)
    out = loaded_qwen3.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)
    reference = torch.softmax(out.logits[0][0].float()[options], -1)
    assert torch.allclose(torch.tensor(p), reference, atol=1e-5) and sum(p) == pytest.approx(1.0)
    v = judge.judge(answer, s, 3)
    best = max(range(6), key=p.__getitem__) + 1
    assert v.scores == tuple(p)
    if p[6] > p[best - 1]:
        assert v.junk and v.matched_panel is None and not v.correct
    else:
        assert v.matched_panel == best and v.correct == (best == 3) and v.raw == str(best)
    assert judge.judge("", s, 3).junk and judge.judge("", s, 3).scores is None  # no forward for an empty answer


# ---------------------------------------------------------------- calibration and its gate

class PicksPanel:
    """A judge that picks a fixed panel (0: junk) whatever the answer."""

    sees_image = True

    def __init__(self, panel):
        self.panel, self.name = panel, f"picks-{panel}"

    def judge(self, answer, strip, target_panel):
        if self.panel == 0:
            return Verdict(None, False, "junk", junk=True)
        return Verdict(self.panel, self.panel == target_panel, "fixed")


class Oracle:
    """Right on every panel but the last, which it calls junk."""

    sees_image = True
    name = "oracle"

    def judge(self, answer, strip, target_panel):
        k = CAPTIONS.index(answer) + 1
        return Verdict(None, False, "junk", junk=True) if k == 6 else Verdict(k, k == target_panel, "read")


def test_calibration_counts_known_judges():
    strips = [strip(), Strip(image=strip().image, panels=strip().panels, strip_id="two", captions=CAPTIONS)]
    items = caption_items(strips)
    assert len(items) == 12 and items[7] == CalibrationItem("two", 2, CAPTIONS[1])
    cal = calibrate(PicksPanel(2), items, strips, "captions")
    assert cal.n == 12 and cal.accuracy == pytest.approx(1 / 6)
    assert cal.picked() == {"1": 0, "2": 1.0, "3": 0, "4": 0, "5": 0, "6": 0, "none": 0}
    assert cal.per_panel() == {"1": 0.0, "2": 1.0, "3": 0.0, "4": 0.0, "5": 0.0, "6": 0.0}
    assert [row[1] for row in cal.confusion] == [2] * 6
    cal = calibrate(Oracle(), items, strips, "captions")
    assert cal.accuracy == pytest.approx(10 / 12) and cal.junk == 2 and cal.picked()["none"] == pytest.approx(2 / 12)
    assert cal.confusion[5][6] == 2 and all(cal.confusion[k][k] == 2 for k in range(5))
    assert sum(cal.picked().values()) == pytest.approx(1.0)
    assert cal.check(0.8) is cal
    with pytest.raises(JudgeError, match=r"83% of 12 calibration answers \(captions\).*refused.*--judge-min-accuracy"):
        cal.check(0.9)
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    junk = calibrate(PicksPanel(0), items, strips, "captions")
    assert junk.accuracy == 0 and junk.junk == 12 and junk.picked()["none"] == 1.0


def test_calibration_of_the_tiny_local_judge(loaded_qwen3):
    from gaze.eval.protocols import eval_strips

    strips = eval_strips("procedural:eval", 1)
    cal = calibrate(VLMJudge(loaded_qwen3), caption_items(strips), strips, "captions")
    d = cal.to_dict()
    assert d["n"] == 6 and len(d["confusion"]) == 6 and all(len(r) == 7 and sum(r) == 1 for r in d["confusion"])
    assert sum(d["picked"].values()) == pytest.approx(1.0)
    assert set(d["picked"]) == {"1", "2", "3", "4", "5", "6", "none"}
    assert d["accuracy"] == pytest.approx(sum(d["confusion"][k][k] for k in range(6)) / 6)
    assert d["judge"] == f"vlm:{loaded_qwen3.model_id}"


# ---------------------------------------------------------------- in a run, and re-judged without the model

def _cfg(tmp_path, qwen3_path, tiny_ranking, **kw):
    from gaze.eval.config import EvalConfig

    base = dict(model=str(qwen3_path), ranking=str(tiny_ranking), strips="procedural:eval", n_strips=2,
                out=str(tmp_path / "eval"), protocols=("vqa",), conditions=("gaze", "none"), top_k=2,
                targets=(2, 3), max_new_tokens=3, narration_tokens=4, n_boot=100, judge_calibration_strips=1,
                device="cpu")
    return EvalConfig(**{**base, **kw})


def test_a_judge_below_the_gate_is_refused_before_any_generation(loaded_qwen3, qwen3_path, tiny_ranking, tmp_path):
    from gaze.eval.protocols import run_eval

    cfg = _cfg(tmp_path, qwen3_path, tiny_ranking, judge="vlm", judge_model=str(qwen3_path), judge_min_accuracy=0.99)
    with pytest.raises(JudgeError, match="verdicts are refused"):
        run_eval(cfg, loaded=loaded_qwen3, progress=False)
    out = tmp_path / "eval"
    assert not (out / "records.jsonl").exists()
    cal = json.loads((out / JUDGES_DIR / slug(f"vlm:{qwen3_path}") / CALIBRATION).read_text())
    assert cal["n"] == 6 and cal["source"] == "captions"


def test_rejudge_round_trip_reproduces_the_aggregate(loaded_qwen3, qwen3_path, tiny_ranking, tmp_path):
    from gaze.eval.cli import main
    from gaze.eval.judges import CaptionJudge
    from gaze.eval.protocols import _finite, aggregate, eval_strips, run_eval

    name = f"vlm:{qwen3_path}"
    cfg = _cfg(tmp_path, qwen3_path, tiny_ranking, judge="vlm", judge_model=str(qwen3_path), judge_min_accuracy=0.0)
    agg = run_eval(cfg, loaded=loaded_qwen3, progress=False)
    out = tmp_path / "eval"
    assert agg["meta"]["judge_calibration"]["n"] == 6 and agg["meta"]["judge_name"] == name
    records = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for r in records:
        v = r["verdicts"][name]
        assert (v["matched"], v["correct"]) == (r["matched"], r["correct"])
        assert r["degenerate"] or (len(v["scores"]) == 7 and v["raw"] in "01234567")
    # the same judge again, without the evaluated model: the same aggregate
    again = rejudge(cfg, progress=False)
    assert again["protocols"] == _finite(agg)["protocols"]
    saved = json.loads((out / JUDGES_DIR / slug(name) / "aggregate.json").read_text())
    assert saved["protocols"] == again["protocols"] and saved["meta"]["judge"] == name
    # another judge: its verdicts join the records, its aggregate is what it says about each answer
    caption = rejudge(_cfg(tmp_path, qwen3_path, tiny_ranking), progress=False)
    strips = {s.strip_id: s for s in eval_strips("procedural:eval", 2)}
    expected = []
    for r in records:
        v = CaptionJudge().judge(r["answer"], strips[r["strip_id"]], r["target"])
        hit = not r["degenerate"] and v.correct
        expected.append({**r, "correct": hit, "matched": None if r["degenerate"] else v.matched_panel})
    assert caption["protocols"] == _finite(aggregate(expected, n_boot=100, seed=0))["protocols"]
    after = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert all(set(r["verdicts"]) == {name, "caption"} for r in after)
    assert [(r["matched"], r["correct"], r["judge"]) for r in after] == [(r["matched"], r["correct"], r["judge"])
                                                                          for r in records]  # primary: the run's
    assert [projected(r, "caption")["correct"] for r in after] == [e["correct"] for e in expected]
    # the run still resumes: every resealed record is reused, none is generated again
    resumed = run_eval(cfg, loaded=loaded_qwen3, progress=False)
    assert resumed["cost"]["new_records"] == 0 and resumed["protocols"] == agg["protocols"]
    assert main(["--out", str(out), "--rejudge", "--judge", "caption", "--quiet"]) == 0


def test_a_hosted_judge_in_a_run_never_writes_its_key(loaded_qwen3, qwen3_path, tiny_ranking, tmp_path, monkeypatch):
    from gaze.eval.judges import degenerate_reason
    from gaze.eval.protocols import run_eval

    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    with Stub([ok(openai_reply('{"panel": 2, "junk": false, "reason": "stub"}'))]) as stub:
        cfg = _cfg(tmp_path, qwen3_path, tiny_ranking, judge="hosted", judge_model="stub-vlm", judge_endpoint=stub.url,
                   judge_key_env="TEST_JUDGE_KEY", judge_min_accuracy=0.0, n_strips=1, conditions=("none",))
        agg = run_eval(cfg, loaded=loaded_qwen3, progress=False)
    assert agg["meta"]["judge_calibration"]["picked"]["2"] == 1.0  # the stub always says panel 2
    assert agg["meta"]["judge_name"] == f"hosted:openai:stub-vlm@{stub.url}"
    records = [json.loads(l) for l in (tmp_path / "eval" / "records.jsonl").read_text().splitlines()]
    asked = [r for r in records if degenerate_reason(r["answer"]) is None]
    assert len(stub.requests) == 6 + len(asked)  # the calibration's six captions, then each judgeable answer
    assert all(r["verdicts"][r["judge"]]["raw"].startswith('{"panel": 2') for r in asked if not r["degenerate"])
    assert all(h["authorization"] == f"Bearer {KEY}" for _, h, _ in stub.requests)
    from gaze.eval.report import write_report

    text = write_report(tmp_path / "eval").read_text()
    assert "a hosted VLM shown the strip image" in text and "calibrated first on 6 answers of known panel" in text
    for path in (tmp_path / "eval").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
