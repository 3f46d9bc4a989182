"""COCO region steering: the paper's natural-image protocol (appendix D.6) on any COCO-format folder.

    gaze eval --protocols region --scenes coco:/data/coco --n-scenes 200 ...
    scenes = coco_scenes("/data/coco", 200, seed=0)   # one `Strip` per image; its "panels" are object boxes

The paper steers the top-100 gaze heads to one annotated object's box at a time
(tokens whose cell centre lies inside, `gaze.regions.box_membership`), asks
"What is the main object in this part of the image? Answer in a few words." and
counts the answer correct when it names the target's COCO category (synonyms
allowed), by COCO size class. Here:

- **Folder.** `PATH` is a COCO folder holding `annotations/instances_*.json`
  (exactly one, or give the JSON file itself as `coco:PATH/annotations/instances_val2017.json`)
  and its images in `images/<split>/`, `images/`, `<split>/` (e.g. `val2017/`) or
  beside the JSON; the first that holds the first image wins.
- **Objects.** Every annotation that is not a crowd region and whose box
  (w x h, COCO's `bbox`) covers at least `MIN_BOX_AREA` = 750 px^2, the paper's
  filter (val2017: 23,452 pairs, mostly removing small objects).
- **Size classes.** COCO's thresholds on the box area in pixels: small below
  32^2, medium below 96^2, large from there (`coco_size_class`).
- **Sampling.** Images with at least one kept object, in a seeded order that
  depends on the seed alone: `n` images are the first `n` of that order, so a run
  with a larger `--n-scenes` extends a smaller one and resumes it (records are
  keyed by image and object). Every kept object of a sampled image is a target.
- **Judge.** `LabelJudge`: the answer is correct when it names the target's
  category (its COCO name, a synonym from `SYNONYMS`, plurals and other forms via
  `gaze.eval.judges.stem`). Phrases are matched longest first, so "teddy bear"
  does not also name "bear" and "hot dog" not "dog". With `--judge embedding` or
  `llm`, that judge picks one of the image's category names instead.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gaze.eval.config import COCO_QUESTION, EvalError  # noqa: F401  (COCO_QUESTION: the protocol's question)
from gaze.eval.judges import CandidateJudge, CaptionJudge, Verdict, _need_target, degenerate_reason, stem
from gaze.strips import Strip

MIN_BOX_AREA = 750.0  # px^2: the paper's filter; smaller boxes own too few image tokens to steer to
COCO_SIZE_CLASSES = (("small", 32 ** 2), ("medium", 96 ** 2))  # COCO's thresholds (area below), then "large"
COCO_CATEGORIES = tuple(w.replace("_", " ") for w in """person bicycle car motorcycle airplane bus train truck boat
    traffic_light fire_hydrant stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe
    backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove
    skateboard surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange
    broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote
    keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier
    toothbrush""".split())  # the 80 COCO detection categories: phrases of those not in the image still use up words

# Other words for COCO categories (the category name itself always counts). Specific words only: a word that
# would name several categories ("vehicle", "animal", "food") would credit an answer that names none.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "people", "child", "kid", "baby", "lady", "guy", "player", "human",
               "skier", "surfer", "skateboarder", "snowboarder", "batter", "catcher", "pitcher", "rider"),
    "bicycle": ("bike", "cycle"), "car": ("automobile", "sedan", "taxi", "cab", "suv"),
    "motorcycle": ("motorbike", "scooter", "moped"), "airplane": ("plane", "aeroplane", "jet", "aircraft", "airliner"),
    "bus": ("buses",), "knife": ("knives",), "train": ("locomotive", "tram"), "truck": ("lorry", "pickup"),
    "boat": ("ship", "sailboat", "canoe", "kayak", "yacht"), "traffic light": ("stoplight", "traffic signal"),
    "fire hydrant": ("hydrant",), "parking meter": ("meter",),
    "bird": ("pigeon", "seagull", "gull", "duck", "parrot", "goose"), "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup"), "horse": ("pony",), "sheep": ("lamb",), "cow": ("cattle", "bull", "calf", "ox"),
    "backpack": ("rucksack",), "umbrella": ("parasol",), "handbag": ("purse", "bag"), "tie": ("necktie",),
    "suitcase": ("luggage",), "skis": ("ski",), "sports ball": ("ball", "football", "basketball", "volleyball"),
    "baseball bat": ("bat",), "baseball glove": ("glove", "mitt"), "tennis racket": ("racket", "racquet"),
    "wine glass": ("glass", "wineglass"), "cup": ("mug",), "hot dog": ("hotdog", "sausage"),
    "donut": ("doughnut",), "chair": ("stool",), "couch": ("sofa",), "potted plant": ("plant", "houseplant"),
    "dining table": ("table",), "tv": ("television", "monitor", "screen"), "laptop": ("notebook computer",),
    "remote": ("remote control", "controller"), "cell phone": ("phone", "cellphone", "smartphone"),
    "refrigerator": ("fridge",), "oven": ("stove",), "teddy bear": ("teddy", "stuffed animal", "plush"),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer"),
}
_WORD = re.compile(r"[a-z]+")


def coco_size_class(area: float) -> str:
    """COCO's size class of an object of `area` px^2: 'small' (< 32^2), 'medium' (< 96^2) or 'large'."""
    for name, below in COCO_SIZE_CLASSES:
        if area < below:
            return name
    return "large"


# ---------------------------------------------------------------- the folder

@dataclass(frozen=True)
class CocoObject:
    """One annotated object kept for steering."""

    annotation_id: int
    category: str  # COCO category name
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels (COCO's x, y, w, h rounded, clipped)
    area: float  # box area w * h in px^2 (COCO's bbox, before rounding)
    size_class: str  # small | medium | large (COCO's thresholds on `area`)


@dataclass(frozen=True)
class CocoImage:
    image_id: int
    path: Path
    objects: tuple[CocoObject, ...]


def _annotation_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise EvalError(f"COCO source {path} not found: give coco:FOLDER (with annotations/instances_*.json) "
                        "or coco:FILE.json")
    found = sorted((path / "annotations").glob("instances_*.json")) or sorted(path.glob("instances_*.json"))
    if not found:
        raise EvalError(f"{path} holds no COCO instances JSON (annotations/instances_*.json): give the folder that "
                        "holds annotations/, or the JSON file as coco:PATH/annotations/instances_val2017.json")
    if len(found) > 1:
        raise EvalError(f"{path} holds {len(found)} instances files ({', '.join(f.name for f in found)}): name one, "
                        f"e.g. coco:{found[0]}")
    return found[0]


def _image_folder(ann_file: Path, first: str) -> Path:
    """Where the images are: the first candidate folder that holds the first image of the JSON."""
    split = ann_file.stem.removeprefix("instances_")  # instances_val2017 -> val2017
    root = ann_file.parent.parent if ann_file.parent.name == "annotations" else ann_file.parent
    candidates = [root / "images" / split, root / "images", root / split, root, ann_file.parent]
    for folder in candidates:
        if (folder / first).is_file():
            return folder
    raise EvalError(f"the images of {ann_file.name} are missing: {first} is in none of "
                    f"{', '.join(str(c) for c in dict.fromkeys(candidates))}; put them in images/ or {split}/")


@functools.lru_cache(maxsize=4)
def _read_index(ann_file: Path, mtime: float, min_area: float) -> tuple[tuple[CocoImage, ...], int, int]:
    try:
        data = json.loads(ann_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"{ann_file} is not readable JSON ({type(e).__name__}: {e}); give a COCO instances file") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise EvalError(f"{ann_file} is not a COCO instances file: no {', '.join(missing)} list; give "
                        "annotations/instances_*.json (COCO detection format)")
    try:
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {int(im["id"]): im for im in data["images"]}
        objects: dict[int, list[CocoObject]] = {}
        n_total = 0
        for a in sorted(data["annotations"], key=lambda a: int(a["id"])):
            n_total += 1
            x, y, w, h = (float(v) for v in a["bbox"])
            im = images[int(a["image_id"])]
            if a.get("iscrowd") or w * h < min_area:
                continue
            W, H = int(im["width"]), int(im["height"])
            box = (max(0, round(x)), max(0, round(y)), min(W, round(x + w)), min(H, round(y + h)))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            objects.setdefault(int(a["image_id"]), []).append(
                CocoObject(int(a["id"]), names[int(a["category_id"])], box, w * h, coco_size_class(w * h)))
    except (KeyError, TypeError, ValueError) as e:
        raise EvalError(f"{ann_file}: a malformed entry ({type(e).__name__}: {e}); images need id, file_name, width, "
                        "height; annotations need id, image_id, category_id, bbox [x, y, w, h]") from None
    if not objects:
        raise EvalError(f"{ann_file}: none of its {n_total} objects has a box of at least {min_area:g} px^2 (the "
                        "paper's filter): use a folder with larger objects")
    folder = _image_folder(ann_file, str(images[min(objects)]["file_name"]))
    kept = tuple(CocoImage(i, folder / str(images[i]["file_name"]), tuple(objs)) for i, objs in sorted(objects.items()))
    return kept, n_total, sum(len(im.objects) for im in kept)


def coco_index(path: str | Path, *, min_area: float = MIN_BOX_AREA) -> tuple[CocoImage, ...]:
    """Every image of a COCO folder with at least one kept object (not crowd, box >= `min_area`), by image id.

    Raises EvalError for a missing or malformed JSON, an image folder that is not there, or no object large enough.
    """
    ann = _annotation_file(Path(path)).resolve()
    return _read_index(ann, ann.stat().st_mtime, float(min_area))[0]


def sample_images(images: Sequence[CocoImage], n: int, seed: int) -> list[CocoImage]:
    """The first `n` images of a seeded order of `images` (the order depends on the seed alone, so a larger `n`
    extends a smaller one)."""
    order = list(images)
    random.Random(f"coco/{seed}").shuffle(order)
    return order[:n]


def coco_scenes(path: str | Path, n: int, *, seed: int = 0, min_area: float = MIN_BOX_AREA) -> list[Strip]:
    """`n` sampled COCO images as scenes for `region_steering`: panels = kept object boxes, captions = their
    category names, `meta["size_classes"]` = their COCO size classes."""
    from gaze.strips import StripError, open_image

    picked = sample_images(coco_index(path, min_area=min_area), n, seed)
    absent = [im.path.name for im in picked if not im.path.is_file()]
    if absent:
        raise EvalError(f"{len(absent)} sampled COCO images are missing from {picked[0].path.parent} (e.g. "
                        f"{', '.join(absent[:3])}): copy the whole image folder")
    out = []
    for im in picked:
        try:
            image = open_image(im.path)
            out.append(Strip(image=image, panels=tuple(o.box for o in im.objects), strip_id=f"coco-{im.image_id}",
                             captions=tuple(o.category for o in im.objects),
                             meta={"kind": "coco", "image_id": im.image_id, "file": im.path.name,
                                   "annotation_ids": [o.annotation_id for o in im.objects],
                                   "areas": [round(o.area, 2) for o in im.objects],
                                   "size_classes": [o.size_class for o in im.objects]}))
        except StripError as e:  # a box beyond the image as it is on disk, or an unreadable file
            raise EvalError(f"COCO image {im.path.name} does not match its annotations: {e}") from None
    return out


# ---------------------------------------------------------------- the judge

def _words(text: str) -> list[str]:
    return [stem(w) for w in _WORD.findall(text.lower())]


def named_categories(answer: str, categories: Sequence[str]) -> list[str]:
    """The categories among `categories` that `answer` names (by name or synonym), in order of first mention.

    Longest phrases are matched first and use up their words, so "a teddy bear" names "teddy bear", not "bear".
    """
    words = _words(answer)
    phrases = sorted({(tuple(_words(p)), c) for c in set(categories) for p in (c, *SYNONYMS.get(c, ()))},
                     key=lambda pc: (-len(pc[0]), pc))
    used = [False] * len(words)
    first: dict[str, int] = {}
    for phrase, category in phrases:
        n = len(phrase)
        for i in range(len(words) - n + 1):
            if tuple(words[i:i + n]) == phrase and not any(used[i:i + n]):
                used[i:i + n] = [True] * n
                first[category] = min(first.get(category, i), i)
    return sorted(first, key=first.get)


@dataclass(frozen=True)
class LabelJudge(CandidateJudge):
    """Does the answer name the target object's category? (the paper's COCO criterion, offline)

    Correct when the target's category is named, whatever else is; a miss that
    names another category of the image is matched to that object, one that
    names none is unmatched. With `inner` (an embedding or LLM judge), `inner`
    picks one of the image's distinct category names instead.
    """

    inner: CandidateJudge | None = None
    name: str = "label"

    def judge(self, answer: str, strip: Strip, target_panel: int) -> Verdict:
        _need_target(target_panel, strip.n_panels)
        labels = list(strip.captions or ())
        target = labels[target_panel - 1]
        bad = degenerate_reason(answer)
        if bad:
            return Verdict(None, False, bad)
        if self.inner is not None:
            distinct = list(dict.fromkeys(labels))
            index, why = self.inner.match(answer, distinct)
            named = [] if index is None else [distinct[index]]
        else:
            named = named_categories(answer, [*labels, *COCO_CATEGORIES])  # the others too: "teddy bear" is no bear
            why = f"names {', '.join(named)}" if named else "names no COCO category"
        if target in named:
            return Verdict(target_panel, True, f"{why}: the target {target!r}")
        inside = [c for c in named if c in labels]
        if inside:
            return Verdict(labels.index(inside[0]) + 1, False, f"{why}: another object of the image, not {target!r}")
        return Verdict(None, False, f"{why}: not {target!r} (nor any object of this image)")


def region_judge(scene: Strip, default: CandidateJudge) -> CandidateJudge:
    """The judge of one region-steering scene: `LabelJudge` for COCO scenes (wrapping an embedding / LLM judge),
    `default` for the others."""
    if scene.meta.get("kind") != "coco":
        return default
    return LabelJudge(inner=None if isinstance(default, CaptionJudge) else default)


def check_coco_source(scenes: str) -> None:
    """Read and check a `coco:PATH` scene source (JSON, image folder, objects) before a model is loaded."""
    if scenes.startswith("coco:"):
        coco_index(scenes.split(":", 1)[1])

