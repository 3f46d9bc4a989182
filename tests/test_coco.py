"""The COCO region protocol on a COCO folder the test writes: filters, size classes, sampling, judge, errors, a run."""

import json

import pytest
from PIL import Image

from gaze.eval.coco import (MIN_BOX_AREA, LabelJudge, coco_index, coco_scenes, coco_size_class, named_categories,
                            sample_images)
from gaze.eval.config import COCO_QUESTION, RECORDS, EvalConfig, EvalError
from gaze.strips import Strip

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 88, "name": "teddy bear"},
              {"id": 3, "name": "car"}]
# (image id, category id, bbox [x, y, w, h], iscrowd) -> kept?, size class
OBJECTS = [
    (1, 1, [10, 10, 30, 25], 0),        # 750 px^2: kept (the filter is "at least 750"), small
    (1, 18, [60, 5, 30, 24.9], 0),      # 747 px^2: dropped
    (1, 3, [100, 40, 32, 32], 0),       # 1024 = 32^2: medium (COCO: small is below 32^2)
    (1, 1, [0, 0, 150, 100], 1),        # a crowd region: dropped
    (2, 88, [0, 0, 96, 96], 0),         # 9216 = 96^2: large
    (2, 18, [100, 0, 95.9, 96], 0),     # 9206.4: medium
    (3, 18, [1, 1, 10, 10], 0),         # 100 px^2: image 3 keeps nothing, so it is never sampled
]
for i in range(4, 14):                  # ten more images with one large person each, for sampling
    OBJECTS.append((i, 1, [8, 8, 120, 100], 0))


def write_coco(root, *, layout="val2017", drop_images=(), objects=OBJECTS):
    """A COCO folder: annotations/instances_val2017.json + 200x150 PNGs in `layout` (val2017/ or images/)."""
    ids = sorted({o[0] for o in objects})
    (root / "annotations").mkdir(parents=True)
    folder = root / layout
    folder.mkdir(parents=True)
    for i in ids:
        if i not in drop_images:
            Image.new("RGB", (200, 150), (i * 20 % 255, 90, 160)).save(folder / f"{i:012d}.png")
    data = {"images": [{"id": i, "file_name": f"{i:012d}.png", "width": 200, "height": 150} for i in ids],
            "annotations": [{"id": 100 + k, "image_id": im, "category_id": c, "bbox": b, "iscrowd": crowd,
                             "area": b[2] * b[3]} for k, (im, c, b, crowd) in enumerate(objects)],
            "categories": CATEGORIES}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path / "coco")


def test_the_paper_filter_and_coco_size_classes(coco):
    index = {im.image_id: im for im in coco_index(coco)}
    assert sorted(index) == list(range(1, 3)) + list(range(4, 14))  # image 3 has no box of 750 px^2
    one, two = index[1].objects, index[2].objects
    assert [(o.annotation_id, o.category, o.size_class) for o in one] == [(100, "person", "small"), (102, "car", "medium")]
    assert [(o.category, o.size_class, o.area) for o in two] == [("teddy bear", "large", 9216.0),
                                                                ("dog", "medium", pytest.approx(9206.4))]
    assert one[0].box == (10, 10, 40, 35) and two[1].box == (100, 0, 196, 96)  # x, y, w, h -> x0, y0, x1, y1
    assert [coco_size_class(a) for a in (1023.9, 1024, 9215.9, 9216)] == ["small", "medium", "medium", "large"]
    assert MIN_BOX_AREA == 750
    assert len(coco_index(coco, min_area=0)) == 13  # without the filter image 3 is in
    # the JSON file itself, and images/ instead of val2017/, work too
    assert [im.image_id for im in coco_index(coco / "annotations" / "instances_val2017.json")] == sorted(index)


def test_images_in_an_images_folder(tmp_path):
    root = write_coco(tmp_path / "c", layout="images")
    assert coco_index(root)[0].path == root / "images" / "000000000001.png"


def test_sampling_is_seeded_a_prefix_and_differs_between_seeds(coco):
    images = coco_index(coco)
    a = [im.image_id for im in sample_images(images, 6, seed=0)]
    assert a == [im.image_id for im in sample_images(images, 6, seed=0)]  # reproducible
    assert a[:4] == [im.image_id for im in sample_images(images, 4, seed=0)]  # a larger n extends a smaller one
    assert a != [im.image_id for im in sample_images(images, 6, seed=1)]
    assert sorted(im.image_id for im in sample_images(images, 99, seed=0)) == sorted(im.image_id for im in images)
    scenes = coco_scenes(coco, 12, seed=0)
    s = next(x for x in scenes if x.strip_id == "coco-2")
    assert s.captions == ("teddy bear", "dog") and s.panels == ((0, 0, 96, 96), (100, 0, 196, 96))
    assert s.meta["size_classes"] == ["large", "medium"] and s.meta["kind"] == "coco"
    assert [x.strip_id for x in coco_scenes(coco, 3, seed=5)] == [f"coco-{i}" for i in
                                                                  [im.image_id for im in sample_images(images, 3, 5)]]


@pytest.mark.parametrize("breakage, message", [
    ("no json", "holds no COCO instances JSON"),
    ("two jsons", "name one"),
    ("not json", "not readable JSON"),
    ("no annotations key", "no annotations list"),
    ("no bbox", "malformed entry"),
    ("no images", "images of instances_val2017.json are missing"),
    ("small only", "none of its 1 objects has a box of at least 750"),
    ("missing folder", "not found"),
])
def test_a_malformed_folder_is_one_clear_error(tmp_path, breakage, message):
    root = write_coco(tmp_path / "c", objects=[(1, 18, [1, 1, 10, 10], 0)] if breakage == "small only" else OBJECTS)
    ann = root / "annotations" / "instances_val2017.json"
    if breakage == "no json":
        ann.unlink()
    elif breakage == "two jsons":
        (root / "annotations" / "instances_train2017.json").write_text("{}")
    elif breakage == "not json":
        ann.write_text("{not json")
    elif breakage == "no annotations key":
        ann.write_text(json.dumps({"images": [], "categories": []}))
    elif breakage == "no bbox":
        data = json.loads(ann.read_text())
        del data["annotations"][0]["bbox"]
        ann.write_text(json.dumps(data))
    elif breakage == "no images":
        for p in (root / "val2017").iterdir():
            p.unlink()
    elif breakage == "missing folder":
        root = tmp_path / "nowhere"
    with pytest.raises(EvalError, match=message):
        coco_index(root)


def test_a_sampled_image_that_is_missing_is_named_before_any_work(tmp_path):
    root = write_coco(tmp_path / "c", drop_images=(7,))
    coco_index(root)  # the first image is there, so the folder is found
    with pytest.raises(EvalError, match=r"sampled COCO images are missing .*000000000007\.png"):
        coco_scenes(root, 12, seed=0)


def test_the_label_judge_names_categories_with_synonyms_and_stems():
    image = Image.new("RGB", (64, 32))
    scene = Strip(image=image, panels=((0, 0, 32, 32), (32, 0, 64, 32), (0, 0, 64, 16)), strip_id="s",
                  captions=("person", "teddy bear", "dog"), meta={"kind": "coco"})
    judge = LabelJudge()
    cases = [  # (answer, target, matched, correct)
        ("Two women walking", 1, 1, True),
        ("A little boy.", 1, 1, True),
        ("a teddy bear", 2, 2, True),
        ("A puppy", 3, 3, True),
        ("Dogs playing", 3, 3, True),
        ("a teddy bear", 3, 2, False),          # names another object of the image: matched to it
        ("A brown bear", 2, None, False),       # "bear" is not "teddy bear"
        ("A man holding a teddy bear", 2, 2, True),  # the target is named; naming others too is allowed
        ("a red car", 1, None, False),          # a COCO category that is not in this image
        ("", 1, None, False),
    ]
    for answer, target, matched, correct in cases:
        v = judge.judge(answer, scene, target)
        assert (v.matched_panel, v.correct) == (matched, correct), (answer, v)
    assert named_categories("A hot dog next to a dog", ["dog", "hot dog"]) == ["hot dog", "dog"]


def test_with_an_inner_judge_the_label_judge_maps_distinct_names_back():
    from gaze.eval.judges import LLMJudge

    seen = []

    def complete(messages):
        seen.append(messages[1]["content"])
        return "2"  # the second distinct name: "dog"

    scene = Strip(image=Image.new("RGB", (64, 32)), panels=((0, 0, 32, 32), (32, 0, 64, 32), (0, 0, 8, 8)),
                  strip_id="s", captions=("person", "dog", "person"))
    judge = LabelJudge(inner=LLMJudge(complete))
    assert judge.judge("a hound", scene, 2).correct
    v = judge.judge("a hound", scene, 3)
    assert not v.correct and v.matched_panel == 2
    assert "1. person\n2. dog\n\n" in seen[0]  # the duplicate "person" is asked about once


# ---------------------------------------------------------------- end to end on a tiny model

def test_region_protocol_on_the_coco_folder_end_to_end(loaded_qwen3, qwen3_path, tmp_path):
    from gaze.discovery import discover
    from gaze.eval.protocols import eval_strips, run_eval
    from gaze.eval.report import write_report

    root = write_coco(tmp_path / "coco")
    ranking = tmp_path / "ranking"
    discover(loaded_qwen3, eval_strips("procedural:discovery", 1), ranking, progress=False)
    cfg = EvalConfig(model=str(qwen3_path), ranking=str(ranking), strips="procedural:eval", n_strips=1, out=str(tmp_path / "e"),
                     protocols=("region",), conditions=("gaze", "none"), top_k=2, max_new_tokens=3,
                     scenes=f"coco:{root}", n_scenes=3, n_boot=100, seed=0)
    assert cfg.question("region") == COCO_QUESTION
    agg = run_eval(cfg, loaded=loaded_qwen3, progress=False)
    records = [json.loads(l) for l in (tmp_path / "e" / RECORDS).read_text().splitlines()]
    picked = coco_scenes(root, 3, seed=0)
    expected = {(f"{c}", s.strip_id, f"{i}:{label}") for c in ("gaze", "none") for s in picked
                for i, label in enumerate(s.captions, start=1)}
    assert {(r["condition"], r["strip_id"], r["target"]) for r in records} == expected
    size = {(s.strip_id, f"{i}:{label}"): z for s in picked
            for i, (label, z) in enumerate(zip(s.captions, s.meta["size_classes"]), start=1)}
    assert all(r["size_class"] == size[(r["strip_id"], r["target"])] for r in records)
    assert {r["question"] for r in records} == {COCO_QUESTION} and {r["judge"] for r in records} == {"label"}
    judged = [r for r in records if r["correct"] is not None]
    assert judged and all(r["correct"] == (LabelJudge().judge(r["answer"], next(
        s for s in picked if s.strip_id == r["strip_id"]), int(r["target"].split(":")[0])).correct) for r in judged
        if not r["degenerate"])
    region = agg["protocols"]["region"]["gaze"]
    assert region["n"] + region["skipped"] == len([r for r in records if r["condition"] == "gaze"])
    assert set(region["per_size"]) <= {"small", "medium", "large"}
    n = len(records)  # rerun: nothing new; more scenes extend the same run (the sample is a prefix)
    assert run_eval(cfg, loaded=loaded_qwen3, progress=False)["cost"]["new_records"] == 0
    from dataclasses import replace

    more = run_eval(replace(cfg, n_scenes=4), loaded=loaded_qwen3, progress=False)
    assert more["n_records"] > n and more["cost"]["new_records"] == more["n_records"] - n
    assert (write_report(tmp_path / "e")).exists()


def test_the_cli_refuses_a_malformed_coco_folder_before_loading_a_model(tmp_path, capsys):
    from gaze.eval.cli import main

    root = write_coco(tmp_path / "c")
    (root / "annotations" / "instances_val2017.json").unlink()
    rc = main(["--model", str(tmp_path / "no-model-here"), "--ranking", str(tmp_path / "no-ranking"),
               "--protocols", "region", "--scenes", f"coco:{root}", "--out", str(tmp_path / "e"), "--quiet"])
    assert rc == 2 and "holds no COCO instances JSON" in capsys.readouterr().err
