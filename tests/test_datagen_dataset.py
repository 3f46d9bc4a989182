"""datagen on disk: rows and Features, the card, resume, retries, folders, Hub push (mocked), the CLI."""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Features, load_dataset, load_from_disk
from huggingface_hub import DatasetCard, HfApi

from datagen import DatagenError, GenerateConfig, make_strip, run
from datagen.cli import main
from datagen.dataset import (FEATURES, HUB_FILES, PAPER_FEATURES, export_folders, push_to_hub, row_to_strip,
                             strip_to_row)
from datagen.procedural import PROCEDURAL
from datagen.run import ImportConfig, import_folders, strip_seed

N, SHARD = 10, 3  # splits 8 + 2; shards (0,3) (3,6) (6,8) | (8,10)


def config(out: Path, **kw) -> GenerateConfig:
    return GenerateConfig(out=str(out), n_strips=N, shard_size=SHARD, **kw)


def snapshot(folder: Path) -> dict[str, str]:
    """Hash of every file under `folder` (what "nothing was overwritten" compares)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def published(folder: Path) -> dict[str, str]:
    """Hashes of the files a user consumes: the card, the Parquet data, the manifest, the arrow data."""
    return {k: v for k, v in snapshot(folder).items() if not k.endswith("state.json")}


def same_rows(a: Dataset, b: Dataset) -> None:
    assert a.features == b.features and len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            va, vb = ra[key], rb[key]
            if key == "image" or key.startswith("panel_") and not key.endswith("boxes"):
                assert np.array_equal(np.asarray(va), np.asarray(vb)), key
            elif key == "panels":
                assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(va, vb))
            else:
                assert va == vb, key


class ScriptedRenderer:
    """The procedural renderer with scripted trouble: an interrupt (Ctrl-C) or failures at given strips."""

    name, model_id = "procedural", None

    def __init__(self, interrupt_at: int | None = None, fail: dict[int, int] | None = None):
        self.interrupt_seed = None if interrupt_at is None else strip_seed(0, interrupt_at)
        self.failures = {strip_seed(0, i): n for i, n in (fail or {}).items()}
        self.calls: list[int] = []

    def check_size(self, size: int) -> None:
        PROCEDURAL.check_size(size)

    def render(self, story, size, seed):
        self.calls.append(seed)
        if seed == self.interrupt_seed:
            raise KeyboardInterrupt
        if self.failures.get(seed, 0) > 0:
            self.failures[seed] -= 1
            raise RuntimeError("CUDA out of memory (simulated)")
        return PROCEDURAL.render(story, size, seed)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted procedural run: the dataset every other run must equal."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    dsd = run(config(out), progress=False)
    return out, dsd


def test_strip_row_round_trip_through_features():
    for strip in (make_strip(1), make_strip(2, letters=False, layout="2x3", gap=4)):
        ds = Dataset.from_list([strip_to_row(strip, 0)], features=FEATURES)
        back = row_to_strip(ds[0])
        assert back == strip  # image bytes, panel boxes, captions, letters, id
        assert back.meta == strip.meta
        assert [np.asarray(p).tobytes() for p in ds[0]["panels"]] == [strip.image.crop(b).tobytes()
                                                                      for b in strip.panels]


def test_run_writes_dataset_card_parquet_and_disk(reference):
    out, dsd = reference
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data", "datagen.json", "disk"]
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "discovery-00000-of-00001.parquet", "evaluation-00000-of-00001.parquet"]
    assert {s: len(d) for s, d in dsd.items()} == {"discovery": 8, "evaluation": 2}
    assert not set(dsd["discovery"]["strip_id"]) & set(dsd["evaluation"]["strip_id"])
    # The Hub path (README configs + Parquet) and the save_to_disk path give the same rows and Features.
    hub = load_dataset(str(out), cache_dir=str(out.parent / "cache"))
    for split in dsd:
        assert hub[split].features == FEATURES
        same_rows(hub[split], dsd[split])
    # Card: YAML metadata read back by huggingface_hub; its Features are the dataset's.
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.size_categories == ["n<1K"]
    assert "visual-question-answering" in card.data.task_categories
    assert Features._from_yaml_list(card.data.dataset_info["features"]) == FEATURES
    assert {s["name"]: s["num_examples"] for s in card.data.dataset_info["splits"]} == {"discovery": 8, "evaluation": 2}
    assert "| renderer | `procedural` |" in card.text
    # Any row can be redrawn from its seed alone.
    row = dsd["evaluation"][1]
    strip = make_strip(strip_seed(0, 9), panel_size=64, align=32)
    assert row["index"] == 9 and row["seed"] == strip_seed(0, 9)
    assert np.array_equal(np.asarray(row["image"]), np.asarray(strip.image))


def test_interrupted_run_resumes_to_the_same_dataset(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        run(config(out), renderer=ScriptedRenderer(interrupt_at=7), progress=False)
    work = sorted(p.name for p in (out / "work").glob("*.parquet"))
    assert work == ["discovery-00000000-00000003.parquet", "discovery-00000003-00000006.parquet"]
    again = ScriptedRenderer()
    run(config(out), renderer=again, progress=False)
    assert again.calls == [strip_seed(0, i) for i in range(6, N)]  # only the unfinished strips
    assert published(out) == published(ref_out)


def test_failed_render_is_retried_and_reported(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "ds"
    run(config(out), renderer=ScriptedRenderer(fail={4: 2}), progress=False)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["index"], f["attempt"]) for f in failures] == [(4, 1), (4, 2)]
    assert "out of memory" in failures[0]["error"]
    assert {k: v for k, v in published(out).items() if k != "failures.jsonl"} == published(ref_out)

    broken = tmp_path / "broken"
    with pytest.raises(DatagenError, match="strip 4 .* failed 3 times"):
        run(config(broken), renderer=ScriptedRenderer(fail={4: 99}), progress=False)
    assert sorted(p.name for p in (broken / "work").glob("*.parquet")) == ["discovery-00000000-00000003.parquet"]


def test_refuses_a_folder_holding_another_dataset(reference, tmp_path):
    out, _ = reference
    before = snapshot(out)
    with pytest.raises(DatagenError, match="seed: 0 there, 1 now"):
        run(config(out, seed=1), progress=False)
    run(config(out), progress=False)  # the same config: already complete, nothing rewritten
    assert snapshot(out) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("someone else's dataset")
    with pytest.raises(DatagenError, match="not written by datagen"):
        run(config(foreign), progress=False)
    assert snapshot(foreign) == {"README.md": hashlib.sha256(b"someone else's dataset").hexdigest()}


def test_paper_schema(tmp_path):
    out = tmp_path / "paper"
    dsd = run(GenerateConfig(out=str(out), n_strips=4, eval_fraction=0.25, schema="paper"), progress=False)
    assert dsd["discovery"].features == PAPER_FEATURES
    assert dsd["discovery"].column_names == ["comic_id", "style", "protagonist", *[f"panel_{k}" for k in range(1, 7)],
                                             *[f"caption_{k}" for k in range(1, 7)]]
    row = dsd["evaluation"][0]
    strip = make_strip(strip_seed(0, 3), panel_size=64, align=32)
    assert row["comic_id"] == 4 and row["protagonist"] == strip.meta["story"]["protagonist"]
    assert [row[f"caption_{k}"] for k in range(1, 7)] == list(strip.captions)
    assert all(np.array_equal(np.asarray(row[f"panel_{k + 1}"]), np.asarray(strip.image.crop(b)))
               for k, b in enumerate(strip.panels))


@pytest.mark.parametrize("schema", ["project", "paper"])
def test_comic_folders_round_trip(tmp_path, schema):
    src = tmp_path / "src"
    dsd = run(GenerateConfig(out=str(src), n_strips=3, eval_fraction=0.34, schema=schema, layout="2x3"),
              progress=False)
    folders = export_folders(dsd, tmp_path / "comics")
    assert sorted(p.name for p in folders) == ["comic1", "comic2", "comic3"]
    assert sorted(p.name for p in folders[0].iterdir()) == ["captions.json"] + [f"p{k}.png" for k in range(1, 7)]
    back = import_folders(ImportConfig(folders=str(tmp_path / "comics"), out=str(tmp_path / "back"), schema=schema))
    for split in dsd:
        same_rows(back[split], dsd[split])
    with pytest.raises(DatagenError, match="not empty"):
        export_folders(dsd, tmp_path / "comics")


def test_import_folders_without_captions(tmp_path):
    # The paper's published panels exported to folders: images only, no captions.json.
    for n in range(1, 4):
        folder = tmp_path / "comics" / f"comic{n}"
        folder.mkdir(parents=True)
        strip = make_strip(n)
        for k, box in enumerate(strip.panels, start=1):
            strip.image.crop(box).resize((96, 96)).save(folder / f"p{k}.png")
    dsd = import_folders(ImportConfig(folders=str(tmp_path / "comics"), out=str(tmp_path / "ds"), eval_fraction=0.3))
    assert {s: len(d) for s, d in dsd.items()} == {"discovery": 2, "evaluation": 1}
    row = dsd["evaluation"][0]
    assert row["strip_id"] == "comic3" and row["captions"] is None and row["image"].size == (576, 96)


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's two network calls replaced by recorders: the test stops at the network boundary."""
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def test_push_uploads_the_card_and_parquet_files(reference, hub_calls, monkeypatch):
    out, _ = reference
    push_to_hub(out, "me/comic-strips", private=True)
    (_, repo, create), (_, upload) = hub_calls
    assert repo == "me/comic-strips" and create == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/comic-strips" and upload["repo_type"] == "dataset"
    assert Path(upload["folder_path"]) == out and upload["allow_patterns"] == HUB_FILES
    uploaded = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                      if p.is_file() and any(fnmatch.fnmatch(str(p.relative_to(out)), pat) for pat in HUB_FILES))
    assert uploaded == ["README.md", "data/discovery-00000-of-00001.parquet", "data/evaluation-00000-of-00001.parquet"]

    with pytest.raises(DatagenError, match="OWNER/NAME"):
        push_to_hub(out, "no-owner")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(DatagenError, match="HF_TOKEN"):
        push_to_hub(out, "me/comic-strips")


def test_cli_generate_push_export_and_errors(tmp_path, hub_calls, capsys):
    out = tmp_path / "ds"
    assert main(["generate", "--out", str(out), "--n-strips", "3", "--no-letters", "--layout", "3x2",
                 "--push-to-hub", "me/strips", "--private"]) == 0
    assert hub_calls[0] == ("create_repo", "me/strips", {"repo_type": "dataset", "private": True, "exist_ok": True})
    row = load_from_disk(str(out / "disk"))["discovery"][0]
    assert row["letters"] is None and row["layout"] == "3x2"
    assert main(["export", "--dataset", str(out), "--out", str(tmp_path / "comics")]) == 0
    assert len(list((tmp_path / "comics").iterdir())) == 3

    for argv, message in [
        (["generate", "--out", str(tmp_path / "a"), "--renderer", "sketchy"], "choose one of procedural, diffusers"),
        (["generate", "--out", str(tmp_path / "b"), "--panel-size", "48"], "multiple of 32"),
        (["generate", "--out", str(tmp_path / "c"), "--renderer", "diffusers"], "needs --model-id"),
        (["generate", "--out", str(out), "--n-strips", "4"], "n_strips: 3 there, 4 now"),
        (["push", "--dataset", str(tmp_path / "comics"), "--repo", "me/x"], "not a finished datagen dataset"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing created for bad input
