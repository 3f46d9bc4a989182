"""What one visitor may send, and what the server keeps for them.

Uploads reach the handler as a file path (`gr.Image(type="filepath",
image_mode=None)`: Gradio only opens the file lazily on the way, which reads
the header):

- a file over `max_bytes` is refused (Gradio's `max_file_size` refuses it
  earlier still, at the upload, when the app is launched with
  `launch_options`);
- the pixel count is read from the file's header (PIL's `Image.open` is
  lazy) and an image over `max_pixels` is refused before a pixel is decoded:
  a 420 KB PNG that claims 144 megapixels costs nothing; PIL's own
  decompression-bomb error becomes the same message;
- a JPEG is decoded at the smallest scale that still covers `MAX_SIDE`.

Sessions: Gradio keeps each visitor's `gr.State` values (the scene and the
last answer's record) on the server. `launch_options` caps how many
sessions are kept (least recently used dropped first) and the states expire
`session_ttl` seconds after they were last written (`gr.State(time_to_live=)`).
Each session is bounded by construction: the image at most `MAX_SIDE` a side,
the record at most `MAX_NEW_TOKENS` rows of float16 attention
(`session_nbytes` measures it). An expired scene is a readable error
(`live_scene`), not a silent switch to another image. Image prefixes (the
KV cache of each image's prompt, for fast first words) are kept server-side,
`PREFIX_PER_SESSION` images for each of at most `PREFIX_SESSIONS` visitors.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_UPLOAD_MB = 20  # default of Settings.max_upload_mb [GAZE_MAX_UPLOAD_MB]
MAX_UPLOAD_PIXELS = 40_000_000  # decoded at most once (~120 MB RGB), then downscaled to MAX_SIDE
MAX_SESSIONS = 100  # default of Settings.max_sessions [GAZE_MAX_SESSIONS]
SESSION_TTL = 3600.0  # s; default of Settings.session_ttl [GAZE_SESSION_TTL]
PREFIX_PER_SESSION = 2  # images whose prompt prefix (KV cache) a visitor keeps
PREFIX_SESSIONS = 16  # visitors whose prefixes are kept (least recently active dropped): a Qwen3-VL-2B prefix of
# ~1,000 image tokens is ~115 MB in bfloat16, so at most 32 of them (~3.7 GB) on a GPU; the organism's are KBs


class LimitError(ValueError):
    """Input over a bound; the message (shown in the page) says the bound and what to do."""


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def open_upload(source: str | Path, *, max_bytes: int, max_pixels: int = MAX_UPLOAD_PIXELS,
                max_side: int | None = None) -> Image.Image:
    """The uploaded image (a file path or a `data:` URL) as RGB, refused before decoding when over a bound.

    `max_side`: a JPEG is decoded directly at a reduced scale that still
    covers this side (the caller downscales to it anyway).
    """
    text = str(source)
    if text.startswith("data:"):
        payload = text.partition(",")[2]
        size = len(payload) * 3 // 4
        if size > max_bytes:
            raise LimitError(f"the pasted image is {_mb(size)}; paste or upload one of at most {_mb(max_bytes)}")
        try:
            fp = io.BytesIO(base64.b64decode(payload, validate=False))
        except ValueError:
            raise LimitError("the pasted data is not an image: paste or upload a PNG, JPEG or WebP file") from None
    else:
        path = Path(text)
        try:
            size = path.stat().st_size
        except OSError:
            raise LimitError("the upload did not arrive: upload the image again") from None
        if size > max_bytes:
            raise LimitError(f"the file is {_mb(size)}; upload an image of at most {_mb(max_bytes)}")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixels below is stricter
            image = Image.open(fp)  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError:  # PIL refuses at open beyond twice its own limit
        raise LimitError(f"the image has too many pixels (a decompression bomb?); upload one of at most "
                         f"{max_pixels / 1e6:.0f} megapixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise LimitError("this file is not an image that can be read: upload a PNG, JPEG or WebP file") from None
    check_pixels(width, height, max_pixels)
    try:
        if max_side:
            image.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that suffices
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LimitError(f"the image could not be decoded ({e}); it may be truncated or damaged: "
                         "upload another file") from None


def check_pixels(width: int, height: int, max_pixels: int = MAX_UPLOAD_PIXELS) -> None:
    if width * height > max_pixels:
        raise LimitError(f"the image is {width}x{height} px ({width * height / 1e6:.0f} megapixels); upload one of "
                         f"at most {max_pixels / 1e6:.0f} megapixels (it is shown and used downscaled anyway)")


def finite_number(value, what: str) -> float:
    """`value` as a finite float, or a LimitError naming `what` ("K", "strength"...)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LimitError(f"{what}: {value!r} is not a number; give a number") from None
    if not math.isfinite(number):
        raise LimitError(f"{what}: {value} is not a finite number; give a finite number")
    return number


def session_nbytes(*values) -> int:
    """Bytes held by a session's state values (images, tensors, the records holding them), for bounds and the soak."""
    import torch

    seen: set[int] = set()

    def size(v) -> int:
        if v is None or id(v) in seen:
            return 0
        seen.add(id(v))
        if isinstance(v, Image.Image):
            return v.width * v.height * len(v.getbands())
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        if hasattr(v, "__dict__"):
            return sum(size(x) for x in vars(v).values())
        return 0

    return sum(size(v) for v in values)
