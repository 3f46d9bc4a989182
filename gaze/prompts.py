"""The paper's prompts, and turning (image, question) into model inputs."""

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


def encode(processor, image, questions: list[str], device=None) -> dict:
    """Processor inputs for one image and several questions (batched, right-padded)."""
    texts = [chat_text(processor, q) for q in questions]
    inputs = processor(text=texts, images=[image] * len(texts), return_tensors="pt", padding=True)
    inputs = dict(inputs)
    if device is not None:
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    return inputs
