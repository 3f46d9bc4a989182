"""datagen against bad input, corrupted work files, a second process, hostile datasets and Ctrl-C.

Bad input: one line on stderr naming the input and the fix, exit 2, before
any expensive work. Resume: a swapped, altered, truncated or stale shard is
named and recomputed, and the dataset equals an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Value, load_from_disk

from datagen import DatagenError, GenerateConfig, run
from datagen.cli import main
from datagen.dataset import export_folders
from datagen.integrity import LOCK, record_path
from datagen.procedural import PROCEDURAL
from datagen.run import strip_seed

N, SHARD = 10, 3  # splits 8 + 2; shards (0,3) (3,6) (6,8) | (8,10)
ROOT = Path(__file__).resolve().parents[1]
datagen_run = sys.modules["datagen.run"]  # the module (`datagen.run` the attribute is the function)


def config(out: Path, **kw) -> GenerateConfig:
    return GenerateConfig(out=str(out), n_strips=N, shard_size=SHARD, **kw)


def published(folder: Path) -> dict[str, str]:
    """Hashes of what a user consumes (the card, Parquet data, manifest, arrow data; not arrow's state.json)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith("state.json")}


class Recorder:
    """The procedural renderer, recording which strips it drew; raises KeyboardInterrupt at one strip if asked."""

    name, model_id = "procedural", None

    def __init__(self, interrupt_at: int | None = None):
        self.interrupt_seed = None if interrupt_at is None else strip_seed(0, interrupt_at)
        self.calls: list[int] = []

    def check_size(self, size):
        PROCEDURAL.check_size(size)

    def render(self, story, size, seed):
        if seed == self.interrupt_seed:
            raise KeyboardInterrupt
        self.calls.append(seed)
        return PROCEDURAL.render(story, size, seed)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "ds"
    run(config(out), progress=False)
    return out


def interrupted_run(out: Path) -> Path:
    """A run stopped at strip 9: shards (0,3) (3,6) (6,8) finished, (8,10) not."""
    with pytest.raises(KeyboardInterrupt):
        run(config(out), renderer=Recorder(interrupt_at=9), progress=False)
    return out / "work"


def shard(work: Path, start: int, stop: int, split: str = "discovery") -> Path:
    return work / f"{split}-{start:08d}-{stop:08d}.parquet"


# ---------------------------------------------------------------- resume: one test per corruption kind


def swap_files(work: Path, tmp_path: Path):
    a, b = shard(work, 0, 3), shard(work, 3, 6)
    shutil.move(a, tmp_path / "a")
    shutil.move(b, a)
    shutil.move(tmp_path / "a", b)
    return {a: "swapped", b: "swapped"}


def swap_files_and_records(work: Path, tmp_path: Path):
    a, b = shard(work, 0, 3), shard(work, 3, 6)
    for x, y in ((a, b), (record_path(a), record_path(b))):
        shutil.move(x, tmp_path / "x")
        shutil.move(y, x)
        shutil.move(tmp_path / "x", y)
    return {a: "swapped", b: "swapped"}


def alter(work: Path, tmp_path: Path):
    path = shard(work, 3, 6)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte, same size
    path.write_bytes(bytes(data))
    return {path: "altered"}


def truncate(work: Path, tmp_path: Path):
    path = shard(work, 6, 8)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return {path: "truncated"}


def stale(work: Path, tmp_path: Path):
    # Shard and record made by a run with other settings (seed 1), dropped into this run's work folder.
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        run(config(other, seed=1), renderer=_seed1_interrupt(), progress=False)
    path = shard(work, 0, 3)
    shutil.copyfile(shard(other / "work", 0, 3), path)
    shutil.copyfile(record_path(shard(other / "work", 0, 3)), record_path(path))
    return {path: "stale"}


def _seed1_interrupt() -> Recorder:
    r = Recorder()
    r.interrupt_seed = strip_seed(1, 3)  # seed 1's strip 3: only its first shard is written
    return r


def no_record(work: Path, tmp_path: Path):
    path = shard(work, 0, 3)
    record_path(path).unlink()
    return {path: "no record"}


@pytest.mark.parametrize("corrupt", [swap_files, swap_files_and_records, alter, truncate, stale, no_record],
                         ids=lambda f: f.__name__)
def test_resume_names_and_recomputes_a_corrupted_shard(corrupt, reference, tmp_path, caplog):
    out = tmp_path / "ds"
    work = interrupted_run(out)
    bad = corrupt(work, tmp_path)
    again = Recorder()
    with caplog.at_level(logging.WARNING, logger="datagen"):
        run(config(out), renderer=again, progress=False)
    for path, why in bad.items():  # each bad file is named, with what is wrong with it
        assert any(str(path) in r.message and why in r.message for r in caplog.records), (path, why, caplog.text)
    redrawn = {i for i in range(N) if strip_seed(0, i) in again.calls}
    expected = {8, 9} | {i for path in bad for i in range(*map(int, path.stem.split("-")[1:]))}
    assert redrawn == expected  # the bad shards and the unfinished one, nothing else
    assert published(out) == published(reference)


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_prints_what_was_kept_and_resumes(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ds"
    monkeypatch.setattr(datagen_run, "build_renderer", lambda cfg: Recorder(interrupt_at=7))
    argv = ["generate", "--out", str(out), "--n-strips", str(N), "--shard-size", str(SHARD)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert lines == [f"interrupted: kept 2 finished shard(s), 6 strips, in {out / 'work'}; "
                     "rerun the same command to resume"]
    assert not (out / LOCK).exists()  # the lock went with the process
    monkeypatch.setattr(datagen_run, "build_renderer", lambda cfg: Recorder())
    assert main(argv) == 0
    assert published(out) == published(reference)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kw):
        raise KeyError("internal")

    monkeypatch.setattr(datagen_run, "strip_to_row", broken)
    with pytest.raises(KeyError):
        main(["generate", "--out", str(tmp_path / "ds"), "--n-strips", "3"])


# ---------------------------------------------------------------- bad input: one line, exit 2, before any work


def read_only_target(tmp_path: Path) -> str:
    if os.geteuid() == 0:  # root writes through any mode bits; /proc refuses even root
        return "/proc/gaze-datagen-test"
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    return str(locked / "ds")


def bad_inputs(tmp_path: Path) -> list[tuple[str, list[str], str]]:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "fonts").mkdir()
    manifest_dir = tmp_path / "manifest-is-a-dir"
    (manifest_dir / "datagen.json").mkdir(parents=True)
    comics = tmp_path / "comics"
    comics.mkdir()
    gen = ["generate", "--out", str(tmp_path / "ds")]
    return [
        ("negative count", gen + ["--n-strips", "-3"], "--n-strips -3 is impossible; give a whole number of at least 2"),
        ("zero count", gen + ["--n-strips", "0"], "--n-strips 0"),
        ("zero shard size", gen + ["--shard-size", "0"], "--shard-size 0"),
        ("zero batch", gen + ["--batch-size", "0"], "--batch-size 0"),
        ("negative retries", gen + ["--retries", "-1"], "--retries -1"),
        ("zero steps", gen + ["--steps", "0"], "--steps 0"),
        ("nan guidance", gen + ["--guidance", "nan"], "--guidance nan"),
        ("nan fraction", gen + ["--eval-fraction", "nan"], "eval fraction nan"),
        ("bad dtype", gen + ["--dtype", "float8"], "--dtype 'float8'"),
        ("no such device", gen + ["--renderer", "diffusers", "--model-id", "x", "--device", "tpu"],
         "--device 'tpu' is not a torch device"),
        ("out under a file", ["generate", "--out", str(tmp_path / "a-file" / "ds")],
         "lies under the file"),
        ("out is a file", ["generate", "--out", str(tmp_path / "a-file")], "is a file; give --out a folder"),
        ("read-only out", ["generate", "--out", read_only_target(tmp_path)], "give --out a folder you can write to"),
        ("folder for a font file", gen + ["--letter-font", str(tmp_path / "fonts")], "is a folder; give a .ttf"),
        ("folder for the manifest", ["generate", "--out", str(manifest_dir)], "cannot be read as a datagen manifest"),
        ("import: zero shard size", ["import", "--folders", str(comics), "--out", str(tmp_path / "i"),
                                     "--shard-size", "0"], "--shard-size 0"),
        ("import: folders is a file", ["import", "--folders", str(tmp_path / "a-file"), "--out", str(tmp_path / "i")],
         "is not a folder; give the folder holding the comicN/ folders"),
        ("import: out under a file", ["import", "--folders", str(comics), "--out", str(tmp_path / "a-file" / "x")],
         "lies under the file"),
        ("export: out is a file", ["export", "--dataset", str(tmp_path / "nothing"), "--out", str(tmp_path / "a-file")],
         "is a file"),
    ]


def test_bad_inputs_are_one_line_errors_before_any_work(tmp_path, monkeypatch, capsys):
    def expensive(*a, **kw):
        raise AssertionError("expensive work started for bad input")

    monkeypatch.setattr(datagen_run, "build_renderer", expensive)
    monkeypatch.setattr(datagen_run, "strips_from_folders", expensive)
    monkeypatch.setattr("datagen.cli.open_dataset", expensive)
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, argv, message in bad_inputs(tmp_path):
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (name, err)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "i").exists()  # nothing created


# ---------------------------------------------------------------- a second process


def test_a_second_process_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys, caplog):
    out = tmp_path / "ds"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom datagen.integrity import output_lock\n"
         "with output_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(120)\n", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["generate", "--out", str(out), "--n-strips", "3"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by process {holder.pid}" in err and "give another --out" in err
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the file stays behind
        holder.wait()
    assert (out / LOCK).exists()
    with caplog.at_level(logging.WARNING, logger="datagen"):
        assert main(["generate", "--out", str(out), "--n-strips", "3"]) == 0
    assert f"locked by process {holder.pid}, which is gone" in caplog.text
    assert not (out / LOCK).exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data", "datagen.json", "disk"]


# ---------------------------------------------------------------- hostile datasets and folders


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "ds"
    return run(GenerateConfig(out=str(out), n_strips=3, eval_fraction=0.34, schema="paper"), progress=False)


@pytest.mark.parametrize("comic_id", ["/../../X", "../escape", "/tmp/absolute", "..", "a/b", "evil\x00"])
def test_export_refuses_ids_that_would_write_outside_out(paper, comic_id, tmp_path, capsys):
    dsd = paper.cast_column("comic_id", Value("string"))
    dsd["evaluation"] = dsd["evaluation"].map(lambda row: {"comic_id": comic_id})
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(DatagenError, match="not a plain folder name"):
        export_folders(dsd, tmp_path / "comics")
    # and through the command line, from a dataset folder on disk (as a Hub dataset could carry it)
    dsd.save_to_disk(str(tmp_path / "hostile"))
    assert main(["export", "--dataset", str(tmp_path / "hostile"), "--out", str(tmp_path / "comics")]) == 2
    assert "not a plain folder name" in capsys.readouterr().err
    after = sorted(str(p) for p in tmp_path.rglob("*") if "hostile" not in str(p))
    assert after == before  # nothing written, inside or outside
    assert not Path("/X").exists() and not (tmp_path.parent / "escape").exists()


def test_export_refuses_two_rows_for_one_folder(paper, tmp_path):
    dsd = paper.map(lambda row: {"comic_id": 1})
    with pytest.raises(DatagenError, match="would both be written to comic1/"):
        export_folders(dsd, tmp_path / "comics")
    assert not (tmp_path / "comics").exists()


def test_import_names_the_comic_and_its_missing_panel(paper, tmp_path, capsys):
    export_folders(paper, tmp_path / "comics")
    (tmp_path / "comics" / "comic2" / "p4.png").unlink()
    assert main(["import", "--folders", str(tmp_path / "comics"), "--out", str(tmp_path / "ds")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # (after the bar)
    assert len(err) == 1 and "comic comic2" in err[0] and "p4" in err[0] and "add the file" in err[0]
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------- progress


def test_long_jobs_show_a_bar_with_total_and_eta(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "ds"), "--n-strips", "4"]) == 0
    err = capsys.readouterr().err
    assert "strips: 100%" in err and "4/4 [" in err and "<" in err  # [elapsed<remaining, rate]
    assert main(["export", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "comics")]) == 0
    assert "export: 100%" in capsys.readouterr().err
    assert len(load_from_disk(str(tmp_path / "ds" / "disk"))["discovery"]) == 3
