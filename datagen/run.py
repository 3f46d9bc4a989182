"""The top level: one strip in memory (`make_strip`), or a whole dataset on disk (`run`).

`make_strip(seed)` is the first four stages in a row:

    story = template_story(seed)                       # 1. story    (datagen.story)
    panels = renderer.render(story, panel_size, seed)  # 2. panels   (datagen.procedural / datagen.diffusion)
    letters = overlay_letters(images, seed, ...)       # 3. letters  (datagen.letters)
    strip = assemble(images, layout=..., ...)          # 4. strip    (datagen.assemble)

and `run(config)` adds stage 5 (datagen.dataset) around it, built to survive
long jobs:

- strip i has its own seed, `strip_seed(config.seed, i)`, so any strip can be
  redrawn alone and the order of work does not matter;
- strips are written in Parquet shards of `shard_size` rows under `out/work/`,
  each file written atomically, with a record of what it was made from (the
  run's settings, its split and strip range) and the hash of its bytes
  (`datagen.integrity`);
- an interrupted run, started again with the same config, skips finished
  shards whose record and bytes check out, and names and recomputes any
  other (swapped, altered, truncated, stale); finishing reads the shards in
  index order, so the dataset equals that of an uninterrupted run;
- one process at a time: the output folder is locked (`datagen.lock`);
- a strip whose rendering raises is retried (same seed, so the same pixels)
  and every failure is logged to `work/failures.jsonl` (kept as
  `out/failures.jsonl`); after `retries` retries the run stops with an error
  naming the strip, never skipping it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from datasets import DatasetDict, load_from_disk
from tqdm.auto import tqdm

from gaze.strips import Strip
from datagen.assemble import assemble, check_geometry
from datagen.dataset import (FORMAT_VERSION, check_output, dataset_card, features_for, load_shards, mark_complete,
                             push_to_hub, rows_by_split, save_dataset, split_sizes, start_output, strip_to_row,
                             strips_from_folders, write_shard)
from datagen.integrity import (RECORD_SUFFIX, check_writable, identity_key, output_lock, verified_shards,
                               write_record)
from datagen.letters import overlay_letters
from datagen.renderers import RENDERERS, Renderer, resolve_renderer
from datagen.story import DatagenError, LMStoryWriter, Story, template_story

log = logging.getLogger("datagen")


def opt(default, help: str):
    """A config field with its help text (shown by the CLI, whose flags share the field names)."""
    return field(default=default, metadata={"help": help})


def strip_seed(base_seed: int, index: int) -> int:
    """The seed of the `index`-th strip of a run: a hash, so runs with nearby seeds share no strip."""
    return int.from_bytes(hashlib.blake2b(f"{base_seed}:{index}".encode(), digest_size=4).digest(), "big")


def make_strip(
    seed: int,
    *,
    panel_size: int = 64,
    gap: int = 0,
    letters: bool = True,
    layout: str = "1x6",
    align: int | None = None,
    renderer: Renderer | str = "procedural",
    story: Story | None = None,
    letter_font: str | None = None,
    strip_id: str | None = None,
    widths: tuple[int, int] | None = None,
    width_multiple: int | None = None,
) -> Strip:
    """One six-panel strip, in memory; the same arguments give the same pixels.

    `widths` (lo, hi): assemble as the paper does: panels keep the common
    height `panel_size` and are stretched to widths drawn (seeded) from lo..hi
    px, with `gap` px of white between them (`align` must then be None);
    `width_multiple`: each drawn width rounded to the nearest multiple of it
    (at least one), as the official code rounds panel widths to 32 px.

    `renderer`: "procedural" (default) or a renderer object such as
    `DiffusionRenderer(pipeline, model_id=...)`. `story`: written elsewhere
    (e.g. by `LMStoryWriter`); default the template story of `seed`. `align`:
    the target model's merged patch size in px (32 for Qwen3-VL); panel size
    and gap must be multiples of it. `strip.meta` holds "letter_boxes",
    "object_boxes" (strip pixels), "story", "prompts", "seed", "renderer",
    "model_id", "reading_order", "layout" and "gap".
    """
    renderer = resolve_renderer(renderer)
    check_geometry(panel_size, gap, layout, align)
    renderer.check_size(panel_size)
    story = story or template_story(seed)
    rendered = renderer.render(story, panel_size, seed)
    images = [p.image for p in rendered]
    objects = [list(p.objects) for p in rendered] if all(p.objects is not None for p in rendered) else None
    chosen = letter_boxes = None
    if letters:  # drawn where they hide the least of the known objects
        avoid = [[o["box"] for o in obs] for obs in objects] if objects else None
        chosen, letter_boxes = overlay_letters(images, seed, avoid, letter_font)
    panel_widths = None
    if widths is not None:
        lo, hi = widths
        if not 1 <= lo <= hi:
            raise DatagenError(f"widths {widths!r}: give (lo, hi) px with 1 <= lo <= hi")
        rng = random.Random(f"widths/{seed}")
        panel_widths = [rng.randint(lo, hi) for _ in images]
        if width_multiple:
            panel_widths = [max(width_multiple, width_multiple * round(w / width_multiple)) for w in panel_widths]
    return assemble(
        images, layout=layout, gap=gap, align=align, strip_id=strip_id or f"seed-{seed}", widths=panel_widths,
        captions=story.captions, letters=chosen, letter_boxes=letter_boxes, object_boxes=objects,
        meta={"story": story.to_dict(), "prompts": list(story.prompts), "seed": seed,
              "renderer": renderer.name, "model_id": renderer.model_id},
    )


@dataclass(frozen=True)
class GenerateConfig:
    """`python -m datagen generate`: synthesise a dataset of strips."""

    out: str | None = opt(None, "output folder: new, empty, or an unfinished run with the same settings (resumed)")
    n_strips: int = opt(100, "number of strips")
    seed: int = opt(0, "base seed; strip i uses a seed hashed from (seed, i)")
    renderer: str = opt("procedural", f"panel renderer: {' or '.join(RENDERERS)}")
    model_id: str | None = opt(None, "diffusers text-to-image checkpoint id or folder (renderer diffusers)")
    device: str = opt("cpu", "torch device of the diffusion pipeline and story model")
    dtype: str = opt("float32", "diffusion dtype: float32, float16 or bfloat16")
    steps: int = opt(4, "diffusion steps per panel")
    guidance: float = opt(0.0, "classifier-free guidance scale (0 for turbo/schnell models, ~7 for SD 1.x)")
    batch_size: int = opt(6, "panels per diffusion call")
    panel_size: int | None = opt(None, "panel side in px (default 64 procedural, 512 diffusers)")
    gap: int = opt(0, "pixels between panels (0, or a multiple of --align)")
    layout: str = opt("1x6", "panel grid, rows x columns: 1x6, 2x3 or 3x2")
    align: int | None = opt(32, "target model's merged patch size in px (32 Qwen3-VL, 28 Qwen2-VL); 0 for none")
    max_width: int | None = opt(None, "assemble as the paper does: panels keep the height --panel-size and take "
                                      "widths drawn from --panel-size to this many px (needs --align 0)")
    letters: bool = opt(True, "overlay a distinct letter on each panel")
    letter_font: str | None = opt(None, "a .ttf/.otf for the letters (default: Pillow's bundled font)")
    story_model: str | None = opt(None, "transformers causal LM id or folder that writes the captions")
    eval_fraction: float = opt(0.2, "fraction of strips (the last ones) in the evaluation split")
    schema: str = opt("project", "row schema: project (everything) or paper (baulab/openai-comic-strips)")
    license: str = opt("mit", "license written in the dataset card")
    shard_size: int = opt(32, "strips per work shard: at most this many are redone after an interruption")
    retries: int = opt(2, "extra attempts for a strip whose rendering fails")
    push_to_hub: str | None = opt(None, "after finishing, upload to this Hub dataset repo OWNER/NAME (token: HF_TOKEN)")
    private: bool = opt(False, "create the Hub repo as private")

    def resolved(self) -> GenerateConfig:
        """The config with defaults that depend on other fields filled in."""
        size = self.panel_size or (512 if self.renderer == "diffusers" else 64)
        return replace(self, panel_size=size, align=self.align or None)

    def identity(self) -> dict:
        """The fields that decide the dataset's content: a folder is resumed only if they all match."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "retries", "push_to_hub", "private")}


def check_config(config: GenerateConfig) -> None:
    """Every error that can be found before anything is loaded or written."""
    if not config.out:
        raise DatagenError("no output folder: give --out DIR")
    if config.renderer not in RENDERERS:
        raise DatagenError(f"unknown renderer {config.renderer!r}; choose one of {', '.join(RENDERERS)}")
    if config.renderer == "diffusers" and not config.model_id:
        raise DatagenError("the diffusers renderer needs --model-id (a checkpoint id or folder), "
                           "e.g. --model-id stabilityai/sdxl-turbo")
    if config.renderer == "procedural" and config.model_id:
        raise DatagenError("--model-id is for --renderer diffusers; the procedural renderer uses no model")
    if config.renderer == "procedural" and config.story_model:
        raise DatagenError("the procedural renderer draws only template stories; "
                           "use --renderer diffusers with --story-model, or drop --story-model")
    check_counts(config, n_strips=2, shard_size=1, batch_size=1, steps=1, retries=0)
    if not math.isfinite(config.guidance) or config.guidance < 0:
        raise DatagenError(f"--guidance {config.guidance}: give a finite scale >= 0 (0 for turbo models, ~7 for SD 1.x)")
    if config.dtype not in DTYPES:
        raise DatagenError(f"--dtype {config.dtype!r}: choose one of {', '.join(DTYPES)}")
    if config.letter_font is not None and not Path(config.letter_font).is_file():
        what = "a folder" if Path(config.letter_font).is_dir() else "not found"
        raise DatagenError(f"--letter-font {config.letter_font} is {what}; give a .ttf or .otf file, or drop the flag")
    if config.renderer == "diffusers" or config.story_model:
        check_device(config.device)
    check_geometry(config.panel_size, config.gap, config.layout, config.align)
    if config.max_width is not None:
        if config.align is not None:
            raise DatagenError("--max-width draws panel widths off the token grid: pass --align 0 with it")
        if config.max_width < config.panel_size:
            raise DatagenError(f"--max-width {config.max_width} is narrower than --panel-size {config.panel_size}: "
                               "give at least the panel height")
    split_sizes(config.n_strips, config.eval_fraction)
    features_for(config.schema)
    if config.renderer == "procedural":
        resolve_renderer("procedural").check_size(config.panel_size)
    check_writable(Path(config.out), "--out")


DTYPES = ("float32", "float16", "bfloat16")


def check_counts(config, **minimum: int) -> None:
    """Each named count field of `config` is a whole number of at least its minimum (the error names the flag)."""
    for name, low in minimum.items():
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            flag = "--" + name.replace("_", "-")
            raise DatagenError(f"{flag} {value!r} is impossible; give a whole number of at least {low}")


def check_device(device: str) -> None:
    """A torch device that exists on this machine (checked before any model loads)."""
    import torch

    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise DatagenError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps")
    if kind == "cuda" and (not torch.cuda.is_available() or (index and int(index) >= torch.cuda.device_count())):
        have = f"{torch.cuda.device_count()} CUDA devices" if torch.cuda.is_available() else "no CUDA device"
        raise DatagenError(f"--device {device}: this machine has {have}; use --device cpu or another index")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DatagenError(f"--device {device}: MPS is not available here; use --device cpu")


def build_renderer(config: GenerateConfig) -> Renderer:
    if config.renderer == "procedural":
        return resolve_renderer("procedural")
    from datagen.diffusion import DiffusionRenderer, load_pipeline

    pipeline = load_pipeline(config.model_id, device=config.device, dtype=config.dtype)
    return DiffusionRenderer(pipeline, model_id=config.model_id, steps=config.steps, guidance=config.guidance,
                             batch_size=config.batch_size)


def render_strip(config: GenerateConfig, index: int, renderer: Renderer, writer: LMStoryWriter | None,
                 failures: Path) -> Strip:
    """Strip `index` of the run, retried up to `config.retries` times; every failure is logged."""
    seed = strip_seed(config.seed, index)
    for attempt in range(config.retries + 1):
        try:
            widths = (config.panel_size, config.max_width) if config.max_width else None
            return make_strip(seed, panel_size=config.panel_size, gap=config.gap, letters=config.letters,
                              layout=config.layout, align=config.align, renderer=renderer, widths=widths,
                              story=writer.write(seed) if writer else None, letter_font=config.letter_font,
                              strip_id=f"strip-{index:06d}")
        except DatagenError:
            raise  # bad input, not bad luck: retrying cannot help
        except Exception as e:  # a renderer can fail in many ways (CUDA OOM, a broken download...)
            with failures.open("a") as f:
                f.write(json.dumps({"index": index, "seed": seed, "attempt": attempt + 1, "error": repr(e)}) + "\n")
            log.warning("strip %d (seed %d) failed on attempt %d/%d: %r", index, seed, attempt + 1,
                        config.retries + 1, e)
            last = e
    raise DatagenError(f"strip {index} (seed {seed}) failed {config.retries + 1} times, last with {last!r}; "
                       f"see {failures}. Fix the cause and rerun the same command: finished shards are kept") from last


def shard_plan(sizes: dict[str, int], shard_size: int) -> list[tuple[str, int, int]]:
    """(split, first index, end index) of every shard; a shard never straddles two splits."""
    plan, start = [], 0
    for split, n in sizes.items():
        for s in range(start, start + n, shard_size):
            plan.append((split, s, min(s + shard_size, start + n)))
        start += n
    return plan


def shard_path(work: Path, split: str, start: int, stop: int) -> Path:
    return work / f"{split}-{start:08d}-{stop:08d}.parquet"


def finish(out: Path, shards: dict[str, list[Path]], schema: str, license: str, pretty_name: str,
           how: dict) -> DatasetDict:
    """Shards -> disk/, data/*.parquet, README.md; mark the folder complete; drop the work files."""
    work = out / "work"
    dsd = load_shards(shards, features_for(schema), work / "cache")
    save_dataset(dsd, out, dataset_card(dsd, schema=schema, license=license, pretty_name=pretty_name, how=how))
    if (work / "failures.jsonl").exists():
        shutil.copyfile(work / "failures.jsonl", out / "failures.jsonl")
    mark_complete(out)
    shutil.rmtree(work)
    return load_from_disk(str(out / "disk"))


def _generate(config: GenerateConfig, out: Path, state: str, renderer: Renderer | None,
              story_writer: LMStoryWriter | None, progress: bool) -> DatasetDict:
    """The body of `run` for a new or unfinished folder (the caller holds its lock)."""
    # Models load before the manifest is written: a model that fails to load leaves nothing behind.
    renderer = renderer or build_renderer(config)
    renderer.check_size(config.panel_size)
    writer = story_writer
    if writer is None and config.story_model:
        writer = LMStoryWriter(config.story_model, device=config.device)
    if state == "new":
        start_output(out, "generate", config.identity())
    sizes = split_sizes(config.n_strips, config.eval_fraction)
    plan = shard_plan(sizes, config.shard_size)
    work = out / "work"
    work.mkdir(exist_ok=True)
    identity = identity_key({"format": FORMAT_VERSION, "tool": "generate", **config.identity()})
    places = {shard_path(work, *s): {"split": s[0], "start": s[1], "stop": s[2]} for s in plan}
    good = verified_shards(places, identity)
    todo = [s for s in plan if shard_path(work, *s) not in good]
    done = config.n_strips - sum(stop - start for _, start, stop in todo)
    with tqdm(total=config.n_strips, initial=done, unit="strip", desc="strips", disable=not progress) as bar:
        for split, start, stop in todo:
            rows = []
            for index in range(start, stop):
                rows.append(strip_to_row(render_strip(config, index, renderer, writer, work / "failures.jsonl"),
                                         index, config.schema))
                bar.update()
            path = shard_path(work, split, start, stop)
            write_shard(path, rows, features_for(config.schema))
            write_record(path, identity, places[path])
    shards = {split: [shard_path(work, *s) for s in plan if s[0] == split] for split in sizes}
    how = {"renderer": config.renderer, "model_id": config.model_id, "story": config.story_model or "template",
           "strips": config.n_strips, "seed": config.seed, "panel_size": config.panel_size,
           "layout": config.layout, "gap": config.gap, "align": config.align, "max_width": config.max_width,
           "letters": config.letters,
           "schema": config.schema}
    if config.renderer == "diffusers":
        how.update(steps=config.steps, guidance=config.guidance, dtype=config.dtype)
    return finish(out, shards, config.schema, config.license, f"Gaze-heads comic strips ({config.renderer})", how)


def kept(out: str | Path) -> str:
    """What an interrupted job left in `out` that a rerun will reuse, in words."""
    work = Path(out) / "work"
    records = sorted(work.glob("*.parquet" + RECORD_SUFFIX)) if work.is_dir() else []
    strips = 0
    for r in records:
        try:
            data = json.loads(r.read_text())
            strips += int(data["stop"]) - int(data["start"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not records:
        return "no finished shard was kept"
    return f"kept {len(records)} finished shard(s), {strips} strips, in {work}"


def run(config: GenerateConfig, *, renderer: Renderer | None = None, story_writer: LMStoryWriter | None = None,
        progress: bool = True) -> DatasetDict:
    """Generate (or resume, or just reopen) the dataset described by `config`; return its splits.

    `renderer` / `story_writer`: pass your own (e.g. a pipeline you built);
    by default they are built from the config.
    """
    config = config.resolved()
    check_config(config)
    out = Path(config.out)
    check_output(out, "generate", config.identity())  # a foreign folder is refused before the lock is written
    with output_lock(out):
        state = check_output(out, "generate", config.identity())
        if state == "complete":
            log.warning("%s already holds this dataset; nothing to do", out)
            dsd = load_from_disk(str(out / "disk"))
        else:
            dsd = _generate(config, out, state, renderer, story_writer, progress)
    if config.push_to_hub:
        push_to_hub(out, config.push_to_hub, private=config.private)
    return dsd


@dataclass(frozen=True)
class ImportConfig:
    """`python -m datagen import`: a dataset from comicN/p1.png..p6.png folders (ours or the paper's)."""

    folders: str | None = opt(None, "folder holding comicN/ folders")
    out: str | None = opt(None, "output folder (new or empty)")
    schema: str = opt("project", "row schema: project or paper")
    eval_fraction: float = opt(0.2, "evaluation fraction for strips whose captions.json records no split")
    license: str = opt("mit", "license written in the dataset card")
    shard_size: int = opt(32, "strips per work shard")


def import_folders(config: ImportConfig, *, progress: bool = False) -> DatasetDict:
    """Read comic folders (split and metadata from their captions.json when present) into a dataset folder."""
    if not config.folders or not config.out:
        raise DatagenError("give --folders (a folder of comicN/ folders) and --out (a new dataset folder)")
    check_counts(config, shard_size=1)
    features_for(config.schema)  # an unknown schema is refused before reading any folder
    split_sizes(2, config.eval_fraction)  # a fraction outside (0, 1) is refused before reading any folder
    if not Path(config.folders).is_dir():
        raise DatagenError(f"--folders {config.folders} is not a folder; give the folder holding the comicN/ folders")
    out = Path(config.out)
    check_writable(out, "--out")
    if check_output(out, "import", asdict(config)) == "complete":
        return load_from_disk(str(out / "disk"))
    with output_lock(out):
        if check_output(out, "import", asdict(config)) == "complete":
            return load_from_disk(str(out / "disk"))
        n = sum(1 for p in Path(config.folders).iterdir() if p.is_dir())
        with tqdm(total=n, unit="strip", desc="import", disable=not progress) as bar:
            items = []
            for item in strips_from_folders(config.folders):  # every folder is read before anything is written
                items.append(item)
                bar.update()
        how = {"source": str(Path(config.folders).resolve()), "strips": len(items), "schema": config.schema}
        return _write_imported(config, out, "import", items, how, "Comic strips (imported)")


def _write_imported(config, out: Path, tool: str, items: list, how: dict, pretty_name: str) -> DatasetDict:
    """Imported (split or None, index, Strip) items -> a finished dataset folder (in `output_lock`)."""
    groups = rows_by_split(items, config.eval_fraction)
    start_output(out, tool, asdict(config))
    work = out / "work"
    work.mkdir(exist_ok=True)
    features = features_for(config.schema)
    shards: dict[str, list[Path]] = {}
    for split, group in groups.items():
        for start in range(0, len(group), config.shard_size):
            chunk = group[start:start + config.shard_size]
            path = shard_path(work, split, chunk[0][0], chunk[-1][0] + 1)
            write_shard(path, [strip_to_row(strip, index, config.schema) for index, strip in chunk], features)
            shards.setdefault(split, []).append(path)
    return finish(out, shards, config.schema, config.license, pretty_name, how)


@dataclass(frozen=True)
class ImportComicsConfig:
    """`python -m datagen import-comics`: a dataset of strips sampled from the COMICS corpus (gaze.comics)."""

    comics: str | None = opt(None, "the COMICS raw_panel_images folder (COMIC/PAGE_PANEL.jpg)")
    out: str | None = opt(None, "output folder (new or empty)")
    n_strips: int = opt(500, "strips to sample (the paper discovers on 500)")
    seed: int = opt(0, "sampling seed: the same seed gives the same windows")
    height: int = opt(256, "common panel height in px (the paper: 256)")
    gap: int = opt(6, "px of white between panels (the paper: 6)")
    align: int | None = opt(None, "round the height and widths to this token size (px), gap painted over borders")
    schema: str = opt("project", "row schema: project or paper")
    eval_fraction: float = opt(0.2, "evaluation fraction")
    license: str = opt("other", "license written in the dataset card (COMICS: research use)")
    shard_size: int = opt(32, "strips per work shard")


def import_comics(config: ImportComicsConfig, *, progress: bool = False) -> DatasetDict:
    """Sample `n_strips` windows of 6 consecutive interior-page panels from COMICS into a dataset folder."""
    from gaze.comics import comics_strips
    from gaze.strips import StripError

    if not config.comics or not config.out:
        raise DatagenError("give --comics (the COMICS raw_panel_images folder) and --out (a new dataset folder)")
    check_counts(config, n_strips=1, shard_size=1, height=1, gap=0)
    if config.align is not None:
        check_counts(config, align=1)
    features_for(config.schema)
    split_sizes(2, config.eval_fraction)
    out = Path(config.out)
    check_writable(out, "--out")
    if check_output(out, "import-comics", asdict(config)) == "complete":
        return load_from_disk(str(out / "disk"))
    with output_lock(out):
        if check_output(out, "import-comics", asdict(config)) == "complete":
            return load_from_disk(str(out / "disk"))
        try:
            strips = comics_strips(config.comics, config.n_strips, seed=config.seed, height=config.height,
                                   gap=config.gap, align=config.align)
            items = [(None, i, s) for i, s in enumerate(tqdm(strips, total=config.n_strips, unit="strip",
                                                             desc="import-comics", disable=not progress))]
        except StripError as e:
            raise DatagenError(str(e)) from None
        how = {"source": str(Path(config.comics).resolve()), "strips": len(items), "schema": config.schema,
               "sampling": f"gaze.comics, seed {config.seed}: a comic, an interior page, 6 consecutive panels"}
        return _write_imported(config, out, "import-comics", items, how, "Comic strips sampled from COMICS")
