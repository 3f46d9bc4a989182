"""Stage 1, story: a seeded plan of six panels around one recurring character.

A `Story` is what every later stage reads: per panel a short caption (the
answer a VLM should give about that panel) and a diffusion prompt; for
template stories also the vocabulary words (character, action, object,
scene) that the procedural renderer draws.

- `template_story(seed)`: the default. A tiny grammar over the vocabulary
  below: one character for the whole strip, six DISTINCT actions (so the six
  captions differ), six distinct scenes and objects. Captions read
  "the cat jumps by a tree"; prompts restate the same character description
  after the same style prefix, which is what keeps a diffusion model's
  character consistent from panel to panel.
- `LMStoryWriter`: optional. Any transformers causal LM (hub id or folder)
  writes six numbered captions for the template's character;
  `parse_story_lines` reads them, and output that does not parse falls back to
  the template story (recorded in `Story.writer`, never silent).

The vocabulary tuples are module constants so that training code can
enumerate every caption the procedural renderer can produce.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

N_PANELS = 6

# The visual vocabulary: the procedural renderer has one drawing per word.
CHARACTERS = ("cat", "robot", "bird", "fish", "frog", "ghost")
ACTIONS = ("jumps", "sleeps", "runs", "eats", "sits", "falls", "sings", "cries")
OBJECTS = ("ball", "tree", "house", "star", "flower", "car", "umbrella", "cake")
SCENES = ("park", "beach", "night", "snow", "desert", "city", "space", "room")

# How the words read in a diffusion prompt. The character description is the
# part that must not change between panels.
CHARACTER_LOOKS = {
    "cat": "a small orange cat with pointed ears and a curly tail",
    "robot": "a small grey box-shaped robot with an antenna",
    "bird": "a round yellow bird with an orange beak",
    "fish": "a purple cartoon fish with big eyes",
    "frog": "a bright green frog with bulging eyes",
    "ghost": "a friendly white ghost with black oval eyes",
}
ACTION_PHRASES = {
    "jumps": "jumping high in the air",
    "sleeps": "lying down asleep",
    "runs": "running fast",
    "eats": "eating a red apple",
    "sits": "sitting down",
    "falls": "falling upside down",
    "sings": "singing, music notes in the air",
    "cries": "crying with big tears",
}
OBJECT_PHRASES = {
    "ball": "a striped beach ball",
    "tree": "a leafy green tree",
    "house": "a small house with a red roof",
    "star": "a big yellow star",
    "flower": "a pink flower",
    "car": "a blue car",
    "umbrella": "a teal umbrella",
    "cake": "a birthday cake with a candle",
}
SCENE_PHRASES = {
    "park": "in a sunny park",
    "beach": "on a sandy beach by the sea",
    "night": "outside at night under the moon",
    "snow": "in a snowy field",
    "desert": "in a hot desert",
    "city": "in a city street",
    "space": "on the moon in outer space",
    "room": "in a cosy room",
}
STYLE = "flat colour cartoon comic panel, bold black outlines, simple shapes"


class DatagenError(ValueError):
    """Bad datagen input or state (any stage); the message says how to fix it."""


@dataclass(frozen=True)
class PanelPlan:
    """One panel of a story: its caption, its prompt, and (template stories) its words."""

    caption: str  # short description, the expected answer about this panel
    prompt: str  # text-to-image prompt: style + character + this panel's action/scene
    action: str | None = None  # ACTIONS word, None for free-text (LM) panels
    object: str | None = None  # OBJECTS word
    scene: str | None = None  # SCENES word


@dataclass(frozen=True)
class Story:
    """Six panels around one recurring character."""

    character: str  # CHARACTERS word of the recurring character
    protagonist: str  # its description, repeated in every prompt
    style: str  # drawing style, the shared prompt prefix
    panels: tuple[PanelPlan, ...]
    writer: str = "template"  # "template", "lm:<model id>", or "template (lm:<id> unparseable)"
    text: str = ""  # the story's source text: the captions, or the LM's raw output

    @property
    def captions(self) -> tuple[str, ...]:
        return tuple(p.caption for p in self.panels)

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(p.prompt for p in self.panels)

    @property
    def drawable(self) -> bool:
        """True when every panel names vocabulary words (what the procedural renderer needs)."""
        return all(p.action and p.object and p.scene for p in self.panels)

    def to_dict(self) -> dict:
        """The story as plain JSON (captions and prompts travel in their own columns)."""
        words = {k: [getattr(p, k) for p in self.panels] if self.drawable else None
                 for k in ("action", "object", "scene")}
        return {"writer": self.writer, "character": self.character, "protagonist": self.protagonist,
                "style": self.style, "text": self.text,
                "actions": words["action"], "objects": words["object"], "scenes": words["scene"]}

    @classmethod
    def from_dict(cls, data: dict, captions: Sequence[str], prompts: Sequence[str]) -> Story:
        """Inverse of `to_dict`, given the captions and prompts stored beside it."""
        n = len(captions)
        actions, objects, scenes = (data.get(k) or [None] * n for k in ("actions", "objects", "scenes"))
        panels = tuple(PanelPlan(c, p, a, o, s) for c, p, a, o, s in zip(captions, prompts, actions, objects, scenes))
        return cls(character=data["character"], protagonist=data["protagonist"], style=data["style"],
                   panels=panels, writer=data["writer"], text=data["text"])


def caption_for(character: str, action: str, obj: str) -> str:
    """The template caption, e.g. "the cat jumps by a tree", "the fish sings by an umbrella"."""
    return f"the {character} {action} by {'an' if obj[0] in 'aeiou' else 'a'} {obj}"


def prompt_for(style: str, protagonist: str, what: str) -> str:
    """A panel prompt: the shared prefix (style, character) first, the panel's content last."""
    return f"{style}, {protagonist}, {what}"


def template_story(seed: int) -> Story:
    """The seeded template story: one character, six distinct actions, scenes and objects."""
    rng = random.Random(f"story/{seed}")  # own stream: other stages' draws never shift the story
    character = rng.choice(CHARACTERS)
    protagonist = CHARACTER_LOOKS[character]
    actions = rng.sample(ACTIONS, N_PANELS)  # distinct actions -> six distinct captions
    objects = rng.sample(OBJECTS, N_PANELS)
    scenes = rng.sample(SCENES, N_PANELS)
    panels = tuple(
        PanelPlan(
            caption=caption_for(character, a, o),
            prompt=prompt_for(STYLE, protagonist,
                              f"{ACTION_PHRASES[a]} next to {OBJECT_PHRASES[o]}, {SCENE_PHRASES[s]}"),
            action=a, object=o, scene=s,
        )
        for a, o, s in zip(actions, objects, scenes)
    )
    return Story(character, protagonist, STYLE, panels, "template", "; ".join(p.caption for p in panels))


# ---------------------------------------------------------------- LM writer

_NUMBERED = re.compile(r"^\s*(?:panel\s*)?(\d+)\s*[.):\-]\s*(.+?)\s*$", re.IGNORECASE)


def parse_story_lines(text: str, n: int = N_PANELS) -> tuple[str, ...] | None:
    """Six captions from numbered lines ("1. ...", "Panel 2: ..."), or None if absent.

    The first line for each number 1..n wins; quotes and a trailing period are
    stripped. None (not a partial story) when a number is missing or two
    captions are the same, so the caller falls back to the template as a whole.
    """
    found: dict[int, str] = {}
    for line in text.splitlines():
        m = _NUMBERED.match(line)
        if m and 1 <= int(m.group(1)) <= n and int(m.group(1)) not in found:
            caption = m.group(2).strip().strip("\"'").rstrip(".").strip()
            if caption:
                found[int(m.group(1))] = caption
    if len(found) < n:
        return None
    captions = tuple(found[k] for k in range(1, n + 1))
    if len({c.lower() for c in captions}) < n:
        return None
    return captions


def lm_prompt(protagonist: str) -> str:
    return (f"Write a six-panel comic strip about {protagonist}. Give exactly six numbered lines, "
            "one short caption per panel; each panel shows a different action in a different place.\n1.")


class LMStoryWriter:
    """Stories written by a transformers causal LM (hub id or local folder).

    The template still chooses the character (so a strip keeps one protagonist);
    the LM writes the six captions. Sampling is seeded per strip, so a story is
    reproducible on the same model, device and library versions.
    """

    def __init__(self, model_id: str, *, device: str = "cpu", max_new_tokens: int = 160):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id)
            self.model = AutoModelForCausalLM.from_pretrained(model_id).to(device).eval()
        except (OSError, ValueError) as e:
            raise DatagenError(
                f"cannot load story model {model_id!r}: {e}\nPass a causal LM hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) "
                "or a folder saved with save_pretrained; offline, the weights must already be in the HF cache. "
                "Or leave out --story-model to use the template grammar."
            ) from None
        self.model_id = model_id
        self.device = device
        self.max_new_tokens = max_new_tokens

    def write(self, seed: int) -> Story:
        """Six LM captions around the template's character, or the template story if they do not parse."""
        import torch

        base = template_story(seed)
        prompt = lm_prompt(base.protagonist)
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        if chat:  # instruct models: the request as a user turn, the answer primed with "1."
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True) + "1."
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).to(self.device)
        torch.manual_seed(seed)  # generate() samples from torch's global generator
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=True, top_p=0.9, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        text = "1." + self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return story_from_lm_text(base, text, self.model_id)


def story_from_lm_text(base: Story, text: str, model_id: str) -> Story:
    """The LM's story if `text` parses into six distinct captions, else `base` marked as a fallback."""
    captions = parse_story_lines(text)
    if captions is None:
        return Story(base.character, base.protagonist, base.style, base.panels,
                     f"template (lm:{model_id} unparseable)", base.text)
    panels = tuple(PanelPlan(c, prompt_for(base.style, base.protagonist, c)) for c in captions)
    return Story(base.character, base.protagonist, base.style, panels, f"lm:{model_id}", text)
