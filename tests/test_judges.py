"""Judges on crafted answers, adversarial ones included: two panels named, empty, looping, wrong letter."""

import json

import pytest
from PIL import Image

from gaze.eval.judges import (
    CaptionJudge, EmbeddingJudge, JudgeError, LetterJudge, LLMJudge, build_llm_messages, content_words,
    degenerate_reason, make_judge, parse_llm_reply, stem,
)
from gaze.strips import Strip

CAPTIONS = ("the cat jumps by a tree", "the cat sleeps by a car", "the cat eats by a ball",
            "the cat cries by a house", "the cat sings by a star", "the cat falls by a cake")
LETTERS = ("K", "A", "Q", "B", "I", "T")


def strip(captions=CAPTIONS, letters=LETTERS) -> Strip:
    image = Image.new("RGB", (384, 64))
    panels = tuple((64 * k, 0, 64 * (k + 1), 64) for k in range(6))
    return Strip(image=image, panels=panels, strip_id="judge-test", captions=captions, letters=letters)


@pytest.mark.parametrize("word,root", [("jumps", "jump"), ("jumping", "jump"), ("jumped", "jump"), ("cries", "cry"),
                                       ("crying", "cry"), ("running", "run"), ("sitting", "sit"), ("sat", "sit"),
                                       ("falling", "fall"), ("houses", "house"), ("sings", "sing"), ("singing", "sing"),
                                       ("glass", "glass"), ("fishes", "fish"), ("ate", "eat")])
def test_stemmer_joins_inflections(word, root):
    assert stem(word) == root


def test_content_words_drop_stop_words_digits_and_punctuation():
    assert content_words("2: The cat is sleeping, by a CAR!") == ["cat", "sleep", "car"]


@pytest.mark.parametrize("answer,panel", [
    ("the cat jumps by a tree", 1),
    ("The cat is sleeping next to a car.", 2),
    ("In this panel, a cat eats near a ball.", 3),
    ("crying", 4),  # the action alone names one panel
    ("3: the cat sings by a star. 4:", 5),  # a narration segment spilling into the next entry
    ("A cat falling beside a birthday cake", 6),
])
def test_caption_judge_finds_the_described_panel(answer, panel):
    judge = CaptionJudge()
    for target in range(1, 7):
        v = judge.judge(answer, strip(), target)
        assert v.matched_panel == panel, v.why
        assert v.correct == (target == panel)


@pytest.mark.parametrize("answer,why", [
    ("the cat jumps by a tree and the cat sleeps by a car", "ambiguous"),  # two panels named
    ("the cat jumps by a car", "ambiguous"),  # panel 1's action, panel 2's object
    ("the cat", "matches no panel"),  # only what every panel shares
    ("a dog reads a newspaper", "matches no panel"),
    ("", "empty"),
    ("   \n ", "empty"),
    ("?!... ,", "no words"),
    ("tree tree tree tree tree tree tree tree", "repetition"),
    ("the cat jumps the cat jumps the cat jumps the cat jumps", "repetition"),
])
def test_caption_judge_misses_adversarial_answers(answer, why):
    v = CaptionJudge().judge(answer, strip(), 1)
    assert v.matched_panel is None and not v.correct
    assert why in v.why


def test_caption_judge_names_every_caption_ambiguous():
    narration = " ".join(f"{k}: {c}." for k, c in enumerate(CAPTIONS, start=1))
    v = CaptionJudge().judge(narration, strip(), 3)
    assert v.matched_panel is None and "ambiguous" in v.why


def test_caption_judge_needs_captions_and_a_valid_target():
    with pytest.raises(JudgeError, match="no captions"):
        CaptionJudge().judge("x", strip(captions=None), 1)
    with pytest.raises(JudgeError, match="out of range"):
        CaptionJudge().judge("x", strip(), 7)


def test_caption_judge_on_object_labels():
    scene = Strip(image=Image.new("RGB", (128, 128)), panels=((0, 0, 40, 40), (60, 60, 120, 120)), strip_id="scene",
                  captions=("frog", "umbrella"))
    assert CaptionJudge().judge("A green frog sits here.", scene, 1).correct
    assert CaptionJudge().judge("umbrellas", scene, 2).correct
    assert CaptionJudge().judge("a frog under an umbrella", scene, 1).matched_panel is None


@pytest.mark.parametrize("answer,panel", [("K", 1), ("k.", 1), ("'Q'", 3), ("The letter is B.", 4),
                                          ("It shows the letter t", 6), ("I see an A.", 2), ("It is I", 5)])
def test_letter_judge_reads_the_letter(answer, panel):
    v = LetterJudge().judge(answer, strip(), panel)
    assert v.matched_panel == panel and v.correct, v.why


@pytest.mark.parametrize("answer,why", [
    ("K and Q", "ambiguous"),  # letters of two panels
    ("the letter K or the letter Q", "ambiguous"),
    ("Z", "names no letter"),  # a letter on no panel
    ("A cat jumps by a tree", "names no letter"),  # "A" is an article here
    ("", "empty"),
])
def test_letter_judge_misses_adversarial_answers(answer, why):
    v = LetterJudge().judge(answer, strip(), 1)
    assert v.matched_panel is None and not v.correct
    assert why in v.why


def test_letter_judge_needs_letters():
    with pytest.raises(JudgeError, match="no letters"):
        LetterJudge().judge("K", strip(letters=None), 1)


def test_degenerate_reason():
    assert degenerate_reason("the cat jumps by a tree") is None
    assert degenerate_reason("") == "empty answer"
    assert "repetition" in degenerate_reason("a b c a b c a b c a b c")


def _bag_of_words(texts):
    vocab = sorted({w for t in CAPTIONS for w in content_words(t)})
    return [[float(w in content_words(t)) for w in vocab] for t in texts]


def test_embedding_judge_with_an_encoder_function():
    judge = EmbeddingJudge(encode=_bag_of_words)
    assert judge.judge("a cat sleeping by the car", strip(), 2).correct
    assert judge.judge("the cat jumps by a car", strip(), 1).matched_panel is None  # two captions tie
    assert judge.judge("", strip(), 1).why == "empty answer"


def test_embedding_judge_says_how_to_fix_a_missing_model(tmp_path):
    with pytest.raises(JudgeError, match="offline"):
        EmbeddingJudge(str(tmp_path / "no-such-model"))


def test_llm_prompt_and_reply_parsing():
    messages = build_llm_messages("  the cat sleeps  ", CAPTIONS)
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    user = messages[1]["content"]
    assert all(f"{k}. {c}" in user for k, c in enumerate(CAPTIONS, start=1))
    assert '"""the cat sleeps"""' in user
    assert parse_llm_reply("3", 6) == 3
    assert parse_llm_reply("Panel 5.", 6) == 5
    assert parse_llm_reply("0", 6) is None
    assert parse_llm_reply("none of them", 6) is None
    assert parse_llm_reply("7", 6) is None
    assert parse_llm_reply("", 6) is None


def test_llm_judge_with_a_fake_completion():
    seen = []

    def complete(messages):
        seen.append(messages)
        return "2" if "sleep" in messages[1]["content"].split("Answer:")[1] else "0"

    judge = LLMJudge(complete)
    assert judge.judge("the cat sleeps", strip(), 2).correct
    v = judge.judge("gibberish words", strip(), 2)
    assert v.matched_panel is None and "no single panel" in v.why
    assert judge.judge("", strip(), 2).why == "empty answer"  # never sent
    assert len(seen) == 2


def test_llm_judge_openai_request_without_network(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    calls = []

    def post(url, headers, body):
        calls.append((url, headers, json.loads(body)))
        return {"choices": [{"message": {"content": "4"}}]}

    judge = LLMJudge.openai("judge-model", base_url="http://localhost:8000/v1/", api_key_env="TEST_JUDGE_KEY", post=post)
    assert judge.judge("a crying cat near a house", strip(), 4).correct
    url, headers, body = calls[0]
    assert url == "http://localhost:8000/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["messages"] == build_llm_messages("a crying cat near a house", CAPTIONS)

    bad = LLMJudge.openai("m", base_url="http://localhost:1/v1", api_key_env="TEST_JUDGE_KEY",
                          post=lambda u, h, b: {"error": "overloaded"})
    with pytest.raises(JudgeError, match="unexpected reply"):
        bad.judge("the cat sleeps", strip(), 2)


def test_llm_judge_key_is_never_required_offline(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(JudgeError, match="NO_SUCH_KEY_VAR"):
        LLMJudge.openai("gpt", base_url="https://api.openai.com/v1", api_key_env="NO_SUCH_KEY_VAR")
    local = LLMJudge.openai("m", base_url="http://localhost:1/v1", api_key_env="NO_SUCH_KEY_VAR",
                            post=lambda u, h, b: {"choices": [{"message": {"content": "1"}}]})
    assert local.judge("a jumping cat by a tree", strip(), 1).correct
    assert isinstance(make_judge("caption"), CaptionJudge)
    assert isinstance(make_judge("letter"), LetterJudge)
    with pytest.raises(JudgeError, match="unknown judge"):
        make_judge("oracle")


@pytest.mark.parametrize("endpoint, allowed", [
    ("https://judge.example/v1", True),
    ("http://127.0.0.1:8000/v1", True),  # loopback
    ("http://localhost:8000/v1", True),
    ("http://judge.example/v1", False),  # plain http to another host: the key would travel in the clear
    ("http://user:pw@judge.example/v1", False),
])
def test_the_api_key_goes_only_to_https_or_loopback_unless_allowed(monkeypatch, endpoint, allowed):
    from gaze.eval.judges import JudgeError, LLMJudge

    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret")
    sent = []
    post = lambda url, headers, body: sent.append(headers) or {"choices": [{"message": {"content": "1"}}]}  # noqa: E731
    if allowed:
        LLMJudge.openai("m", base_url=endpoint, api_key_env="TEST_JUDGE_KEY", post=post).complete([])
        assert sent[0]["Authorization"] == "Bearer sk-secret"
    else:
        with pytest.raises(JudgeError, match="plain http") as err:
            LLMJudge.openai("m", base_url=endpoint, api_key_env="TEST_JUDGE_KEY", post=post)
        assert "pw" not in str(err.value) and "sk-secret" not in str(err.value)
        LLMJudge.openai("m", base_url=endpoint, api_key_env="TEST_JUDGE_KEY", post=post, allow_http=True).complete([])
    with pytest.raises(JudgeError, match="not an http"):
        LLMJudge.openai("m", base_url="file:///etc/passwd", api_key_env="TEST_JUDGE_KEY", post=post)


def test_the_endpoint_is_shown_and_recorded_without_credentials(monkeypatch):
    from gaze.eval.judges import LLMJudge, public_url

    assert public_url("https://user:pw@judge.example:8443/v1?key=sk-1") == "https://judge.example:8443/v1"
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    judge = LLMJudge.openai("m", base_url="http://u:p@127.0.0.1:9/v1?token=t", api_key_env="NO_SUCH_KEY_VAR",
                            post=lambda u, h, b: {})
    assert judge.model_id == "m@http://127.0.0.1:9/v1"


def test_a_redirect_is_refused_and_the_key_does_not_follow_it(monkeypatch):
    """A local stub server answers 307 to another address; the judge stops there and names the fix."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from gaze.eval.judges import JudgeError, LLMJudge

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret")
        judge = LLMJudge.openai("m", base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key_env="TEST_JUDGE_KEY",
                                timeout=5)
        with pytest.raises(JudgeError, match="redirect"):
            judge.complete([{"role": "user", "content": "x"}])
    finally:
        server.shutdown()
    assert [p for p, _ in seen] == ["/v1/chat/completions"]  # the redirect's target never got a request
