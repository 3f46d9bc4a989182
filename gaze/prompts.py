"""The paper's prompts, and turning (image, question) into model inputs.

`Inputs` is what the model is called with (`model(**inputs)`,
`model.generate(**inputs)`) and, beside it, the image layout of that prompt,
so that `steer` and `Tracker` read geometry from the inputs they are given.
"""

from __future__ import annotations

from dataclasses import dataclass

# The paper's wordings (its text and its code's), the defaults for every model. A model folder that records
# the prompts it was trained on (`prompts.json`, as the model organism's does) gets those instead: `for_model`.
PANEL_QUESTION = ("Look carefully at this six-panel comic strip. What is happening in the {ordinal} panel from the left? "
                  "Answer briefly.")  # the discovery question
SHORT_PANEL_QUESTION = "What is happening in the {ordinal} panel from the left?"
LETTER_QUESTION = "Which letter is on the {ordinal} panel?"
STRIP_QUESTION = "What is the main action or event happening in this comic strip? Answer briefly."  # VQA
NARRATION_PROMPT = ("Please describe what happens in each panel, in order. Start each panel description with "
                    "'Panel 1:', 'Panel 2:', and so on.")
THIS_PANEL_QUESTION = "What is happening in this panel of the comic strip?"  # static narration
# dynamic narration, as the official code asks it (05_steer_dynamic_narration.py)
DYNAMIC_NARRATION_PROMPT = ("Please describe each panel of this comic strip in order as I point you to them. Keep each "
                            "description SHORT \u2014 one brief sentence per panel, naming the action and the salient "
                            "objects. Do not summarise the whole strip first; just describe panel by panel.")
REVERSE_PREFIX = "Read the comic in reverse, "  # the paper's reading-order prompt, before a panel question


def lower_first(text: str) -> str:
    """`text` with its first letter lower-cased, to follow a prefix ("Read the comic in reverse, which ...")."""
    return text[:1].lower() + text[1:]


def in_reverse(question: str, prefix: str = REVERSE_PREFIX) -> str:
    """`question` read in reverse: answered from the panel counted from the right ("Read the comic in reverse, which
    letter is on the 2nd panel?" asks the 5th panel's letter)."""
    return prefix + lower_first(question)


REVERSE_QUESTION = in_reverse(SHORT_PANEL_QUESTION)
REVERSE_LETTER_QUESTION = in_reverse(LETTER_QUESTION)


@dataclass(frozen=True)
class Prompts:
    """The questions one model is asked: the paper's, or those its folder records (`prompts.json`)."""

    discovery: str = PANEL_QUESTION  # about panel {ordinal}: the gaze score's question
    panel: str = SHORT_PANEL_QUESTION  # a shorter panel question
    vqa: str = STRIP_QUESTION  # the whole strip (answered from panel 1 by most VLMs)
    static_narration: str = THIS_PANEL_QUESTION  # names no panel
    narration: str = NARRATION_PROMPT  # panel by panel, "Panel k:" markers
    letter: str = LETTER_QUESTION  # the letter overlaid on panel {ordinal}
    reverse: str = REVERSE_QUESTION  # panel {ordinal} counted from the right
    reverse_letter: str = REVERSE_LETTER_QUESTION  # the letter of panel {ordinal} counted from the right

    @classmethod
    def for_model(cls, folder) -> "Prompts":
        """The prompts recorded in `folder/prompts.json` (missing keys: the paper's); the paper's if none."""
        import json
        from pathlib import Path

        path = Path(folder) / "prompts.json" if folder else None
        if path is None or not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known and isinstance(v, str)})


PRESETS = {
    "whole strip": STRIP_QUESTION,
    "narrate": NARRATION_PROMPT,
    "this panel": THIS_PANEL_QUESTION,
}


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th'."""
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def panel_question(k: int, template: str = PANEL_QUESTION) -> str:
    """The question about panel `k` (1-based) from `template` (which may use {ordinal} and {k})."""
    return template.format(ordinal=ordinal(k), k=k)


def chat_text(processor, question: str) -> str:
    """The chat-templated prompt text for one image and one question, ready for generation."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class Inputs(dict):
    """Processor outputs for one image and one prompt (batch of 1), and the prompt's image layout.

    A plain dict to the model; `layout` (a `gaze.regions.ImageLayout`) says
    which sequence positions are image tokens and which pixels each covers.
    """

    def __init__(self, data: dict, layout):
        super().__init__(data)
        self.layout = layout

    @property
    def prompt_len(self) -> int:
        return int(self["input_ids"].shape[1])
