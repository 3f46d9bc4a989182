"""Stage 5, dataset: strips <-> rows with explicit Features, the card, files, Hub, folders.

Two schemas:

- "project" (`FEATURES`): one row per strip with everything datagen knows:
  the strip image, its six panel images, captions, letters, letter / panel /
  object boxes (strip pixels), reading order, story, prompts, seed, renderer
  and model id.
- "paper" (`PAPER_FEATURES`): the published schema of
  `baulab/openai-comic-strips`: `comic_id`, `style`, `protagonist`,
  `panel_1..panel_6` images and `caption_1..caption_6`, so the two datasets
  load the same way.

An output folder, once finished, holds:

    README.md                    dataset card, YAML metadata first (license, size, features, splits)
    data/<split>-00000-of-0000N.parquet   the Hub layout: what --push-to-hub uploads
    disk/                        `DatasetDict.save_to_disk`, for `load_from_disk`
    datagen.json                 manifest: the tool and config that wrote the folder

While a run is in progress, `work/` holds its shards (see `datagen.run`).
Splits ("discovery", "evaluation") are cut by strip index, so they share no strip.

Folders: `export_folders` writes `comicN/p1.png..p6.png` + `captions.json`
(the paper's data layout, read by `gaze.strips.load_folder_strip`);
`strips_from_folders` reads them back, ours or the paper's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import datasets
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Image, List, Value
from datasets.info import DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from PIL import Image as PILImage
from tqdm.auto import tqdm

from gaze.strips import (Strip, StripError, iter_comic_folders, open_image, panel_files, save_folder_strip,
                         stitch_panels)
from datagen.assemble import assemble, reading_order
from datagen.integrity import LOCK, atomic_path, atomic_write, safe_name
from datagen.story import N_PANELS, DatagenError

SCHEMAS = ("project", "paper")
SPLITS = ("discovery", "evaluation")
MANIFEST = "datagen.json"
FORMAT_VERSION = 1  # bump when rows change meaning; a folder of another version is refused
MAX_PARQUET_BYTES = 500 << 20  # per data file, like `push_to_hub`, so the Hub viewer can read each file

BOX = List(Value("int32"), length=4)  # [x0, y0, x1, y1], pixels, x1/y1 exclusive
STORY = {
    "writer": Value("string"),  # "template", "lm:<model id>", "template (lm:<id> unparseable)"
    "character": Value("string"),  # recurring character (vocabulary word)
    "protagonist": Value("string"),  # its description, shared by every prompt
    "style": Value("string"),  # drawing style, the prompt prefix
    "text": Value("string"),  # the story's source text
    "actions": List(Value("string")),  # per panel, template stories only
    "objects": List(Value("string")),
    "scenes": List(Value("string")),
}
FEATURES = Features({
    "strip_id": Value("string"),
    "index": Value("int32"),  # position in the run; decides the split
    "seed": Value("int64"),  # the strip's own seed: make_strip(seed) redraws it
    "image": Image(),  # the whole strip
    "panels": List(Image(), length=N_PANELS),  # the six panel images, reading order
    "captions": List(Value("string"), length=N_PANELS),
    "letters": List(Value("string"), length=N_PANELS),  # null when letters are off
    "letter_boxes": List(BOX, length=N_PANELS),  # strip pixels
    "panel_boxes": List(BOX, length=N_PANELS),  # strip pixels, reading order
    "object_boxes": List(List({"label": Value("string"), "box": BOX}), length=N_PANELS),  # null if unknown
    "reading_order": List(List(Value("int32"), length=2), length=N_PANELS),  # [row, column] per panel
    "layout": Value("string"),  # "1x6", "2x3" or "3x2"
    "gap": Value("int32"),  # pixels between panels
    "story": STORY,
    "prompts": List(Value("string"), length=N_PANELS),
    "renderer": Value("string"),
    "model_id": Value("string"),  # null for the procedural renderer
})
# The published schema: comic_id is int32 there (1..N).
PAPER_FEATURES = Features({
    "comic_id": Value("int32"),
    "style": Value("string"),
    "protagonist": Value("string"),
    **{f"panel_{k}": Image() for k in range(1, N_PANELS + 1)},
    **{f"caption_{k}": Value("string") for k in range(1, N_PANELS + 1)},
})


def features_for(schema: str) -> Features:
    if schema not in SCHEMAS:
        raise DatagenError(f"unknown schema {schema!r}; choose one of {', '.join(SCHEMAS)}")
    return FEATURES if schema == "project" else PAPER_FEATURES


# ---------------------------------------------------------------- rows

def strip_to_row(strip: Strip, index: int, schema: str = "project") -> dict:
    """One dataset row for `strip`, the `index`-th of its dataset."""
    features_for(schema)  # an unknown schema is an error, not the project schema
    meta = strip.meta
    story = meta.get("story")
    panels = [strip.image.crop(box) for box in strip.panels]
    captions = list(strip.captions) if strip.captions else None
    if schema == "paper":
        row = {"comic_id": meta.get("comic_id", index + 1),
               "style": story["style"] if story else meta.get("style"),
               "protagonist": story["protagonist"] if story else meta.get("protagonist")}
        row.update({f"panel_{k + 1}": im for k, im in enumerate(panels)})
        row.update({f"caption_{k + 1}": captions[k] if captions else None for k in range(len(panels))})
        return row
    layout = meta.get("layout", "1x6")
    return {
        "strip_id": strip.strip_id, "index": index, "seed": meta.get("seed"), "image": strip.image,
        "panels": panels, "captions": captions, "letters": list(strip.letters) if strip.letters else None,
        "letter_boxes": meta.get("letter_boxes"), "panel_boxes": [list(b) for b in strip.panels],
        "object_boxes": meta.get("object_boxes"), "reading_order": meta.get("reading_order") or reading_order(layout),
        "layout": layout, "gap": meta.get("gap", 0), "story": story, "prompts": meta.get("prompts"),
        "renderer": meta.get("renderer"), "model_id": meta.get("model_id"),
    }


def row_to_strip(row: dict) -> Strip:
    """The Strip of a decoded row, in either schema (inverse of `strip_to_row`)."""
    if "comic_id" in row:
        panels = [row[f"panel_{k}"] for k in range(1, N_PANELS + 1)]
        image, boxes = stitch_panels(panels)
        captions = [row[f"caption_{k}"] for k in range(1, N_PANELS + 1)]
        return Strip(image=image, panels=boxes, strip_id=f"comic{row['comic_id']}",
                     captions=tuple(captions) if all(c is not None for c in captions) else None,
                     meta={"comic_id": row["comic_id"], "style": row["style"], "protagonist": row["protagonist"]})
    meta_keys = ("story", "prompts", "seed", "renderer", "model_id", "letter_boxes", "object_boxes",
                 "reading_order", "layout", "gap")
    return Strip(image=row["image"].convert("RGB"), panels=tuple(tuple(b) for b in row["panel_boxes"]),
                 strip_id=row["strip_id"], captions=tuple(row["captions"]) if row["captions"] else None,
                 letters=tuple(row["letters"]) if row["letters"] else None,
                 meta={k: row[k] for k in meta_keys})


# ---------------------------------------------------------------- splits and shards

def split_sizes(n: int, eval_fraction: float) -> dict[str, int]:
    """Strips per split: the first ones go to discovery, the last `eval_fraction` to evaluation."""
    if not 0 < eval_fraction < 1:
        raise DatagenError(f"eval fraction {eval_fraction} is impossible; use a number strictly between 0 and 1")
    if n < 2:
        raise DatagenError(f"{n} strips cannot fill two disjoint splits; make at least 2")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return {"discovery": n - n_eval, "evaluation": n_eval}


def split_of(index: int, sizes: dict[str, int]) -> str:
    return "discovery" if index < sizes["discovery"] else "evaluation"


def write_shard(path: Path, rows: list[dict], features: Features) -> None:
    """Write rows as one Parquet file, atomically: a file that exists is complete."""
    with quiet_datasets(), atomic_path(path) as tmp:
        Dataset.from_list(rows, features=features).to_parquet(str(tmp))


def load_shards(shards: dict[str, list[Path]], features: Features, cache_dir: Path) -> DatasetDict:
    """A DatasetDict from per-split lists of shard files, rows in file order."""
    with quiet_datasets():
        return DatasetDict({split: Dataset.from_parquet([str(p) for p in files], features=features,
                                                        cache_dir=str(cache_dir), split=split)
                            for split, files in shards.items()})


# ---------------------------------------------------------------- output folder

def check_output(out: Path, tool: str, config: dict) -> str:
    """Whether `out` may receive this tool's output: "new", "resume" or "complete". Writes nothing.

    Refuses a folder that holds other files, or a manifest for another
    tool/config/format, so nothing of another dataset is ever overwritten.
    """
    if out.exists() and not out.is_dir():
        raise DatagenError(f"--out {out} is a file; give --out a folder for the dataset (new or empty)")
    path = out / MANIFEST
    if path.exists():
        try:
            found = json.loads(path.read_text())
            found["config"], found["complete"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatagenError(f"{path} cannot be read as a datagen manifest ({e}); "
                               "choose a new --out folder") from None
        if (out / "work").exists() and not (out / "work").is_dir():
            raise DatagenError(f"{out / 'work'} is a file where datagen keeps its work folder; "
                               "move it away or choose a new --out folder")
        if found.get("format") != FORMAT_VERSION or found.get("tool") != tool:
            raise DatagenError(f"{out} holds a dataset written by datagen {found.get('tool')!r} (format "
                               f"{found.get('format')}); choose a new --out folder")
        diff = sorted(k for k in set(config) | set(found["config"]) if config.get(k) != found["config"].get(k))
        if diff:
            changes = ", ".join(f"{k}: {found['config'].get(k)!r} there, {config.get(k)!r} now" for k in diff)
            raise DatagenError(f"{out} holds another dataset ({changes}); choose a new --out folder, "
                               "or rerun with the same settings to resume it")
        return "complete" if found["complete"] else "resume"
    if out.exists() and any(p.name != LOCK for p in out.iterdir()):
        names = sorted(p.name for p in out.iterdir() if p.name != LOCK)[:5]
        raise DatagenError(f"{out} is not empty ({', '.join(names)}, ...) and was not written by datagen; "
                           "choose a new or empty --out folder")
    return "new"


def start_output(out: Path, tool: str, config: dict) -> None:
    """Create `out` with its manifest (after `check_output` said "new")."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / MANIFEST, {"format": FORMAT_VERSION, "tool": tool, "config": config, "complete": False})


def mark_complete(out: Path) -> None:
    path = out / MANIFEST
    _write_json(path, {**json.loads(path.read_text()), "complete": True})


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


# ---------------------------------------------------------------- card and files

def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def dataset_card(dsd: DatasetDict, *, schema: str, license: str, pretty_name: str, how: dict) -> str:
    """README.md for the dataset: YAML metadata (license, tasks, size, configs, features, splits), then prose.

    `how` lists the settings that produced the data (renderer, model, seed...),
    rendered as a table under "How it was generated".
    """
    from huggingface_hub import DatasetCardData

    features = features_for(schema)
    n = sum(len(ds) for ds in dsd.values())
    data = DatasetCardData(
        license=license, language=["en"], task_categories=["visual-question-answering", "image-to-text"],
        size_categories=[size_category(n)], pretty_name=pretty_name,
        tags=["comics", "synthetic", "interpretability", "attention-heads"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in dsd]}],
    )
    splits = SplitDict()
    for s, ds in dsd.items():
        splits.add(SplitInfo(name=s, num_bytes=ds.data.nbytes, num_examples=len(ds)))
    DatasetInfosDict({"default": DatasetInfo(features=features, splits=splits)}).to_dataset_card_data(data)
    settings = "\n".join(f"| {k} | `{'none' if v is None else v}` |" for k, v in how.items())
    columns = ("one row per strip in the published schema of "
               "[baulab/openai-comic-strips](https://huggingface.co/datasets/baulab/openai-comic-strips): "
               "`comic_id`, `style`, `protagonist`, `panel_1`..`panel_6`, `caption_1`..`caption_6`"
               if schema == "paper" else
               "one row per strip: `image` (the strip), `panels` (six panel images, reading order), "
               "`captions`, `letters` (overlaid letter per panel, or null), `letter_boxes`, `panel_boxes` and "
               "`object_boxes` (`[x0, y0, x1, y1]` in strip pixels; object boxes null when the renderer "
               "does not know them), `reading_order` (`[row, column]` per panel), `layout`, `gap`, `story`, "
               "`prompts`, `seed` (redraw a strip with `datagen.make_strip(seed)` for procedural data), "
               "`renderer`, `model_id`")
    split_lines = "\n".join(f"- `{s}`: {len(ds)} strips" for s, ds in dsd.items())
    body = f"""
# {pretty_name}

Six-panel comic strips for finding and steering *gaze heads* in vision-language
models: the attention heads whose attention follows the image region the model
is describing. Each strip is one image with known panel boxes; ask about the
k-th panel and check the answer against its caption (or its overlaid letter).

## Contents

{columns}.

Splits are cut by strip index and share no strip:

{split_lines}

## How it was generated

Synthesised by the project's `datagen` tool: a seeded story (one recurring
character, six distinct panels), panels rendered, optional letter overlays,
panels stitched into one strip.

| setting | value |
| --- | --- |
{settings}

## Use

```python
from datasets import load_dataset
ds = load_dataset("path/or/owner-name")  # splits: {", ".join(dsd)}
```

## Limitations

Procedural panels are simple flat drawings (a model organism's world, not
natural images); diffusion panels carry no object boxes and inherit the
biases of the checkpoint that drew them.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide `datasets`' own progress bars (datagen shows one bar per run), restoring the setting after."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def save_dataset(dsd: DatasetDict, out: Path, card: str) -> list[Path]:
    """Write `disk/` (save_to_disk), `data/*.parquet` (Hub layout) and README.md; return the Parquet files."""
    files = []
    with quiet_datasets():
        dsd.save_to_disk(str(out / "disk"))
        (out / "data").mkdir(exist_ok=True)
        for split, ds in dsd.items():
            n = max(1, math.ceil(ds.data.nbytes / MAX_PARQUET_BYTES))
            for i in range(n):
                path = out / "data" / f"{split}-{i:05d}-of-{n:05d}.parquet"
                with atomic_path(path) as tmp:
                    ds.shard(n, i, contiguous=True).to_parquet(str(tmp))
                files.append(path)
    atomic_write(out / "README.md", card)
    return files


HUB_FILES = ["README.md", "data/*.parquet"]  # what a push uploads: the card and the Parquet data


def push_to_hub(out: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> None:
    """Upload the card and the Parquet files of a finished dataset folder to the Hub dataset `repo_id`.

    The token comes from `token` or the HF_TOKEN environment variable. The repo
    is created if missing (private if asked; an existing repo keeps its visibility).
    """
    from huggingface_hub import HfApi

    out = Path(out)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise DatagenError(f"hub repo {repo_id!r} is not OWNER/NAME; e.g. --push-to-hub my-user/comic-strips")
    manifest = out / MANIFEST
    if not manifest.exists() or not json.loads(manifest.read_text()).get("complete"):
        raise DatagenError(f"{out} is not a finished datagen dataset; finish the run before pushing")
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise DatagenError("no Hugging Face token: set HF_TOKEN to a token with write access "
                           "(https://huggingface.co/settings/tokens)")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(out), allow_patterns=HUB_FILES,
                      commit_message="Upload comic strips generated by datagen")


# ---------------------------------------------------------------- comic folders

def export_folders(dsd: DatasetDict, dest: str | Path, *, progress: bool = False) -> list[Path]:
    """Write every row as `dest/comicN/p1.png..p6.png` + `captions.json` (N = index + 1, or comic_id).

    `captions.json` carries captions, letters and everything else the row
    knows (boxes, story, split...), so `strips_from_folders` restores the rows.
    Folder names come from the data, so they are checked first: an id that is
    not a plain name ("../x", "/etc") or that two rows share is refused before
    anything is written. Each folder is written under a temporary name, then
    renamed: a `comicN/` that exists is complete.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise DatagenError(f"--out {dest} is a file; give --out a new or empty folder")
    if dest.exists() and any(dest.iterdir()):
        raise DatagenError(f"{dest} is not empty; export into a new or empty folder")
    names: dict[str, str] = {}
    for split, ds in dsd.items():
        ids = ds["comic_id"] if "comic_id" in ds.column_names else [i + 1 for i in ds["index"]]
        for position, number in enumerate(ids):
            where = f"row {position} of split {split!r}"
            name = safe_name(f"comic{number}", f"{where}: folder name")
            if name in names:
                raise DatagenError(f"{where} and {names[name]} would both be written to {name}/; "
                                   "give every row its own comic_id or index")
            names[name] = where
    dest.mkdir(parents=True, exist_ok=True)
    folders = []
    total = sum(len(ds) for ds in dsd.values())
    with tqdm(total=total, unit="strip", desc="export", disable=not progress) as bar:
        for split, ds in dsd.items():
            for row in ds:
                strip = row_to_strip(row)
                number = row["comic_id"] if "comic_id" in row else row["index"] + 1
                extra = {"split": split} if "comic_id" in row else {"split": split, "index": row["index"],
                                                                     "strip_id": row["strip_id"]}
                final = dest / f"comic{number}"
                tmp = dest / f".comic{number}.tmp"
                if tmp.exists():
                    shutil.rmtree(tmp)
                save_folder_strip(replace(strip, meta={**strip.meta, **extra}), tmp)
                os.replace(tmp, final)
                folders.append(final)
                bar.update()
    return folders


def strips_from_folders(root: str | Path) -> Iterator[tuple[str | None, int, Strip]]:
    """(split or None, index, Strip) for each `comicN/` folder under `root`, in natural order.

    Reads `captions.json` if present: a list of captions (the minimal form) or
    the dict that `export_folders` writes. Folders without one (e.g. the
    paper's published panels) give strips without captions.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatagenError(f"{root} is not a folder of comicN/ folders")
    for position, folder in enumerate(iter_comic_folders(root)):
        try:
            images = [open_image(p) for p in panel_files(folder, N_PANELS)]
        except StripError as e:
            raise DatagenError(f"cannot import comic {folder.name}: {e}; add the file, "
                               f"or move {folder.name}/ out of {root}") from None
        data: dict = {}
        if (folder / "captions.json").exists():
            data = json.loads((folder / "captions.json").read_text())
            data = {"captions": data} if isinstance(data, list) else data
        meta = {k: v for k, v in data.items() if k not in ("captions", "letters", "split", "index", "strip_id")}
        side = images[0].width
        if any(im.size != (side, side) for im in images):
            # Foreign panels of mixed or non-square sizes become squares of the first panel's width.
            images = [im.resize((side, side), PILImage.BICUBIC) for im in images]
        strip = assemble(images, layout=meta.get("layout", "1x6"), gap=meta.get("gap", 0),
                         strip_id=data.get("strip_id") or folder.name, captions=data.get("captions"),
                         letters=data.get("letters"))
        # Boxes in captions.json are already in strip pixels; keep them as they are.
        strip = replace(strip, meta={**strip.meta, **meta})
        yield data.get("split"), data.get("index", position), strip


def rows_by_split(items: Iterable[tuple[str | None, int, Strip]],
                  eval_fraction: float) -> dict[str, list[tuple[int, Strip]]]:
    """Group imported strips by split: their recorded split if it is one of ours, else by index like a run."""
    items = sorted(items, key=lambda item: item[1])
    sizes = split_sizes(len(items), eval_fraction)
    groups: dict[str, list[tuple[int, Strip]]] = {s: [] for s in SPLITS}
    for split, index, strip in items:
        groups[split if split in groups else split_of(index, sizes)].append((index, strip))
    empty = [s for s, g in groups.items() if not g]
    if empty:
        raise DatagenError(f"no strips for split(s) {empty}; import more strips or change --eval-fraction")
    return groups
