"""The paper's prompts, and turning (image, question) into model inputs.

`Inputs` is what the model is called with (`model(**inputs)`,
`model.generate(**inputs)`) and, beside it, the image layout of that prompt,
so that `steer` and `Tracker` read geometry from the inputs they are given.
"""

from __future__ import annotations

PANEL_QUESTION = "What is happening in the {ordinal} panel from the left?"
LETTER_QUESTION = "Which letter is on the {ordinal} panel?"
STRIP_QUESTION = "What is the main action happening in this comic strip? Answer briefly."
NARRATION_PROMPT = "Describe this comic strip panel by panel."
THIS_PANEL_QUESTION = "What is happening in this panel?"

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
