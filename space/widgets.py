"""Input widgets whose bad values are a readable page error (numbers, and uploads that are not images).

Gradio converts a widget's value (`preprocess`) before any handler runs, so a
handler cannot catch what fails there: `K = "abc"` sent through the API made
`gr.Slider` fail with an empty error. These subclasses check the value first
and raise `gr.Error` with a message that says what to give. (Gradio writes a
`widgets.pyi` stub beside this file when it defines them; it is ignored by git.)
"""

from __future__ import annotations

import gradio as gr

from space.limits import LimitError, finite_number


def _page_number(value, label: str):
    try:
        return finite_number(value, label)
    except LimitError as e:
        raise gr.Error(str(e), print_exception=False) from None


class Slider(gr.Slider):
    """`gr.Slider` whose bad values from an API call ("abc", nan) are a readable page error, not an empty one."""

    is_template = True

    def preprocess(self, payload):
        return super().preprocess(_page_number(payload, self.label))


class Number(gr.Number):
    """`gr.Number`, with the same readable errors as `Slider`."""

    is_template = True

    def preprocess(self, payload):
        return None if payload is None else super().preprocess(_page_number(payload, self.label))


NOT_AN_IMAGE = "this file is not an image that can be read: upload a PNG, JPEG or WebP file"


class ImageUpload(gr.Image):
    """`gr.Image` for uploads: a file that is not an image (Gradio opens it with PIL on the way, before any
    handler) is one readable page error instead of PIL's "cannot identify image file '/tmp/gradio/...'"."""

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, truncated files, SVG parse errors ...
            if "DecompressionBomb" in type(e).__name__:  # PIL's own pixel limit: the handler's message says it
                raise gr.Error("the image has too many pixels (a decompression bomb?); upload a smaller one",
                               print_exception=False) from None
            raise gr.Error(NOT_AN_IMAGE, print_exception=False) from None
