"""Dataset schemas a strip can be read from, detected from the columns.

- project: one strip image column (`strip`) and its `panel_boxes`
  (plus `captions`, `letters`, `strip_id` when present), as written by `datagen`;
- paper: six image columns `panel_1 .. panel_6` (the published
  `baulab/openai-comic-strips` layout), a `comic_id`, and per-panel captions as
  six `caption_k`-style columns or one list column; panels are stitched
  exactly as for the folder layout `comicN/p1.png .. p6.png`.

A dataset in no known schema gets an error listing the columns found and the
ones expected.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from gaze.strips import Strip, StripError, stitch_panels

STRIP_COLUMNS = ("strip", "image")
BOX_COLUMNS = ("panel_boxes",)
ID_COLUMNS = ("strip_id", "comic_id", "id")
PANEL_COLUMN = re.compile(r"^panel_?(\d+)$")
CAPTION_COLUMN = re.compile(r"^(?:caption|panel_caption|panel_\d+_caption)_?(\d+)?$")
CAPTION_LIST_COLUMNS = ("captions", "panel_captions")


def _panel_columns(columns) -> list[str]:
    found = sorted(((int(m.group(1)), c) for c in columns if (m := PANEL_COLUMN.match(c))), key=lambda t: t[0])
    return [c for _, c in found]


def _caption_columns(columns, n: int) -> list[str] | None:
    for pattern in ("caption_{k}", "caption{k}", "panel_{k}_caption", "panel_caption_{k}"):
        cols = [pattern.format(k=k) for k in range(1, n + 1)]
        if all(c in columns for c in cols):
            return cols
    return None


def detect(columns) -> str:
    """'project' or 'paper', or a StripError naming what was found and what is expected."""
    columns = list(columns)
    if any(c in columns for c in STRIP_COLUMNS) and any(c in columns for c in BOX_COLUMNS):
        return "project"
    panels = _panel_columns(columns)
    if len(panels) >= 2:
        return "paper"
    raise StripError(
        f"dataset columns {columns} match no known strip schema: expected either a strip image column "
        f"({' or '.join(STRIP_COLUMNS)}) with 'panel_boxes' (project schema), or image columns "
        "panel_1 .. panel_6 with per-panel captions (paper schema)"
    )


def _to_image(value, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io

        try:
            src = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
            with Image.open(src) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad panel
            raise StripError(f"{where}: unreadable image ({e})") from None
    raise StripError(f"{where}: missing image")


def strip_from_row(row: dict, index: int, *, align: int | None = None, gap: int = 0) -> Strip:
    """Convert one dataset row (either schema) to a `Strip`."""
    columns = list(row)
    schema = detect(columns)
    strip_id = next((str(row[c]) for c in ID_COLUMNS if c in row and row[c] is not None), f"row{index}")
    meta = {k: row[k] for k in ("story", "style", "protagonist", "seed", "renderer", "model_id") if k in row}
    if schema == "project":
        image = _to_image(row[next(c for c in STRIP_COLUMNS if c in row)], f"strip {strip_id}")
        boxes = tuple(tuple(int(v) for v in b) for b in row["panel_boxes"])
        captions = tuple(row["captions"]) if row.get("captions") else None
        letters = tuple(row["letters"]) if row.get("letters") else None
        return Strip(image=image, panels=boxes, strip_id=strip_id, captions=captions, letters=letters, meta=meta)
    panel_cols = _panel_columns(columns)
    images = []
    for k, col in enumerate(panel_cols, start=1):
        if row.get(col) is None:
            raise StripError(f"comic {strip_id}: panel {k} ({col}) is missing; pass --skip-bad to skip such rows")
        images.append(_to_image(row[col], f"comic {strip_id} panel {k}"))
    image, boxes = stitch_panels(images, gap=gap, align=align)
    captions = None
    cap_cols = _caption_columns(columns, len(panel_cols))
    if cap_cols:
        captions = tuple(str(row[c]) for c in cap_cols)
    else:
        for c in CAPTION_LIST_COLUMNS:
            if isinstance(row.get(c), (list, tuple)) and len(row[c]) == len(panel_cols):
                captions = tuple(str(x) for x in row[c])
                break
    return Strip(image=image, panels=boxes, strip_id=strip_id, captions=captions, meta=meta)


def open_dataset(source: str, split: str | None = None):
    """A `datasets.Dataset` from a `save_to_disk` folder, a folder of Parquet files, or a hub id."""
    import datasets

    path = Path(source)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        ds = datasets.load_from_disk(str(path))
    else:
        # a local folder of Parquet files (splits from file names, as on the Hub) or a hub id
        ds = datasets.load_dataset(str(path)) if path.is_dir() else datasets.load_dataset(source, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) == 1:
                return next(iter(ds.values()))
            raise StripError(f"{source} has splits {sorted(ds)}: choose one with --split")
        if split not in ds:
            raise StripError(f"{source} has no split {split!r}; its splits are {sorted(ds)}")
        return ds[split]
    return ds
