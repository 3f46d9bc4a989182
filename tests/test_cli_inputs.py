"""Bad command-line input: one line naming the input and the fix, exit code 2, before any model is loaded."""

import re
from pathlib import Path

import pytest

from gaze.cli import main

ROOT = Path(__file__).resolve().parents[1]

RANKING = "gaze/organism/weights/ranking.json"
IMAGE = "space/examples/strip_1.png"
STEER = ["steer", "--model", "organism", "--ranking", RANKING, "--image", IMAGE]

CASES = [  # (arguments, words the one-line error must hold)
    (STEER + ["--target", "3", "--strength", "nan"], "--strength"),
    (STEER + ["--target", "3", "--strength", "inf"], "--strength"),
    (STEER + ["--target", "3", "--strength", "1e300"], "--strength"),
    (STEER + ["--target", "3", "--top-k", "0"], "--top-k"),
    (STEER + ["--target", "0"], "--target"),
    (STEER + ["--target", "x"], "--target"),
    (STEER + ["--target", "3", "--device", "tpu"], "--device"),
    (STEER + ["--target", "3", "--device", "cuda:3"], "--device"),
    (STEER + ["--target", "3", "--every", "0"], "--every"),
    (["inspect", "--ranking", RANKING, "--image", IMAGE, "--target", "0"], "--target"),
    (["discover", "--strips", "x", "--out", "y", "--n-strips", "-3"], "--n-strips"),
    (["discover", "--strips", "x", "--out", "y", "--start", "-1"], "--start"),
    (["doctor", "--image", IMAGE, "--panels", "0"], "--panels"),
]


@pytest.mark.parametrize("argv, named", CASES, ids=[" ".join(a[len(STEER):] if a[:1] == ["steer"] else a) for a, _ in CASES])
def test_bad_arguments_are_refused_at_parse_time(argv, named, capsys, monkeypatch):
    import gaze.models

    monkeypatch.setattr(gaze.models, "load", lambda *a, **k: pytest.fail("a model was loaded for bad input"))
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert named in err and "error" in err


@pytest.mark.parametrize("schedule", ["1,,2", "1,2,", ",1"])
def test_a_schedule_with_an_empty_entry_is_refused(schedule):
    from gaze.errors import GazeError
    from gaze.steering import parse_schedule

    with pytest.raises(GazeError, match="empty entry"):
        parse_schedule(schedule, every=4)
    assert len(parse_schedule("4, 2 ,1", every=4).targets) == 3


@pytest.mark.parametrize("command, kept", [("discover", "rerun the same command to resume"), ("steer", "nothing")])
def test_ctrl_c_ends_with_one_line_saying_what_was_kept(command, kept, capsys, monkeypatch, tmp_path):
    import gaze.cli

    def interrupted(args):
        raise KeyboardInterrupt

    argv = {"discover": ["discover", "--strips", "x", "--out", str(tmp_path / "run")],
            "steer": STEER + ["--target", "2"]}[command]
    parser = gaze.cli.build_parser

    def patched():
        p = parser()
        for action in p._subparsers._group_actions[0].choices.values():
            action.set_defaults(func=interrupted)
        return p

    monkeypatch.setattr(gaze.cli, "build_parser", patched)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and kept in err[0]


# ---------------------------------------------------------------- more parse-time refusals (templates, variants, outputs)

PARSE_TIME = [  # (arguments, words the one-line error must hold)
    (["discover", "--strips", "x", "--out", "y", "--prompt", "What is happening in this panel?"], "--prompt"),
    (["discover", "--strips", "x", "--out", "y", "--prompt", "{foo}"], "--prompt"),
    (["discover", "--strips", "x", "--out", "y", "--prompt", "the {ordinal panel"], "--prompt"),
    (["discover", "--strips", "x", "--out", "y", "--variant", "bogus"], "--variant"),
    (["discover", "--strips", "x", "--out", "y", "--top", "-1"], "--top"),
    (["discover", "--strips", "x", "--out", "y", "--dtype", "float8"], "--dtype"),
    (["eval", "--targets", "0"], "--targets"),
    (["eval", "--targets", "1,,2"], "--targets"),
    (["eval", "--n-strips", "0"], "--n-strips"),
    (["eval", "--ks", "0,2"], "--ks"),
    (["eval", "--strength", "nan"], "--strength"),
    (["eval", "--device", "tpu"], "--device"),
    (["eval", "--random-percentile", "0"], "--random-percentile"),
    (["eval", "--scene-size", "0x5"], "--scene-size"),
]


@pytest.mark.parametrize("argv, named", PARSE_TIME, ids=[" ".join(a) for a, _ in PARSE_TIME])
def test_templates_variants_and_eval_numbers_are_refused_at_parse_time(argv, named, capsys, monkeypatch, tmp_path):
    test_bad_arguments_are_refused_at_parse_time(argv, named, capsys, monkeypatch)


def _read_only(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def _output_cases(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    locked = _read_only(tmp_path)
    under = str(tmp_path / "a-file" / "out")
    return [
        (["discover", "--strips", "x", "--out", under], "--out", "lies under the file"),
        (["discover", "--strips", "x", "--out", str(tmp_path / "a-file")], "--out", "is a file"),
        (["discover", "--strips", "x", "--out", str(locked / "run")], "--out", "cannot write"),
        (["eval", "--out", under], "--out", "lies under the file"),
        (["inspect", "--ranking", RANKING, "--image", IMAGE, "--out", under], "--out", "lies under the file"),
        (["doctor", "--image", IMAGE, "--out", str(tmp_path / "a-folder")], "--out", "is a folder"),
        (STEER + ["--target", "2", "--trajectory-out", under + ".json"], "--trajectory-out", "lies under the file"),
        (STEER + ["--target", "2", "--trajectory-out", str(tmp_path / "a-folder")], "--trajectory-out", "is a folder"),
        (STEER + ["--target", "2", "--trajectory-out", str(locked / "t.json")], "--trajectory-out", "cannot write"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_unwritable_outputs_are_refused_at_parse_time(case, tmp_path, capsys, monkeypatch):
    import os

    argv, flag, words = _output_cases(tmp_path)[case]
    if "cannot write" in words and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (see test_read_only_outputs_are_refused)")
    import gaze.models

    monkeypatch.setattr(gaze.models, "load", lambda *a, **k: pytest.fail("a model was loaded for bad input"))
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and words in err and "output path" in err


# ---------------------------------------------------------------- refused after parsing, before any model loads

def _ranking_file(tmp_path, name, data):
    import json

    path = tmp_path / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _organism_ranking(**changes):
    import json
    from pathlib import Path

    return {**json.loads(Path(RANKING).read_text()), **changes}


def _bomb(path, width=20_000, height=20_000):
    """A PNG whose header says width x height and that holds no pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return str(path)


def _before_load_cases(tmp_path):
    nan = _organism_ranking()
    nan["scores"] = [[float("nan")] * len(row) for row in nan["scores"]]
    strings = _organism_ranking()
    strings["scores"] = [["high"] * len(row) for row in strings["scores"]]
    steer = ["steer", "--model", "organism", "--image", IMAGE, "--target", "2", "--ranking"]
    return [
        (steer + [_ranking_file(tmp_path, "list", [1, 2, 3])], "holds a JSON list"),
        (steer + [_ranking_file(tmp_path, "strings", strings)], "not a table of numbers"),
        (steer + [_ranking_file(tmp_path, "nan", nan)], "all 32 of its scores are NaN"),
        (steer + [_ranking_file(tmp_path, "other", _organism_ranking(model_id="Qwen/Qwen3-VL-2B-Instruct"))],
         "made for 'Qwen/Qwen3-VL-2B-Instruct', not 'organism'"),
        (steer + ["runs/nothing"], "no ranking folder or file runs/nothing"),
        (STEER + ["--target", "7"], "--target 7 is out of range"),
        (STEER + ["--target", "2", "--top-k", "33"], "--top-k 33 is more than the model's 32 heads"),
        (["eval", "--ranking", RANKING, "--targets", "7", "--out", str(tmp_path / "e")], "--targets 7"),
        (["discover", "--strips", str(tmp_path / "strips") + "/", "--out", str(tmp_path / "d")], "not found"),
        (["doctor", "--image", _bomb(tmp_path / "bomb.png")], "megapixels"),
        (["doctor", "--image", IMAGE, "--box", "1,2,3"], "bad box"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_inputs_found_after_parsing_are_one_line_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    import gaze.models

    argv, words = _before_load_cases(tmp_path)[case]
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)  # 'runs/nothing' with runs/ here: a missing local folder, not a hub id
    argv = [a if not a.startswith(("gaze/", "space/")) else str(ROOT / a) for a in argv]
    monkeypatch.setattr(gaze.models, "load", lambda *a, **k: pytest.fail("a model was loaded for bad input"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and words in err[0], err


@pytest.mark.parametrize("name, words", [("./no-such-model", "no such folder here, and it is neither a hub id"),
                                         ("runs/no-such-model", "neither a hub id"),
                                         ("nobody/no-such-model", "not in the local cache while HF_HUB_OFFLINE")])
def test_an_unknown_model_fails_at_once_in_one_line(name, words, tmp_path, monkeypatch):
    import time

    from gaze.errors import ModelNotFoundError
    from gaze.models import load

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match=words) as e:
        load(name)
    assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value) and name in str(e.value)


# ---------------------------------------------------------------- help


def test_every_option_of_every_command_has_help_that_shows_its_default():
    import argparse

    from gaze.cli import HelpFormatter, build_parser

    commands = dict(build_parser()._subparsers._group_actions[0].choices)
    assert set(commands) == {"discover", "steer", "inspect", "eval", "doctor", "probe"}
    probes = commands.pop("probe")._subparsers._group_actions[0].choices
    commands.update({f"probe {k}": v for k, v in probes.items()})
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = HelpFormatter(name)._get_help_string(action)
            assert action.help and "default" in text, (name, action.option_strings, text)
        sub.format_help()  # every help string formats


@pytest.mark.parametrize("argv", [["--help"], ["discover", "--help"], ["eval", "--help"], ["steer", "--help"]])
def test_help_imports_no_heavy_module(argv):
    """`gaze --help` stays fast (well under 1.5 s) because printing help loads no torch, numpy, datasets."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\nfrom gaze.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(sys.modules)))" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert "(default:" in out or argv == ["--help"]
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "transformers", "numpy", "datasets", "PIL")]
    assert not heavy, heavy[:5]


# ---------------------------------------------------------------- the same classes of bad input through the Python API

def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    import io

    from gaze.strips import MAX_PIXELS, StripError, open_image, strip_from_row

    bomb = _bomb(tmp_path / "bomb.png", 7_000, 7_000)  # above MAX_PIXELS, below PIL's own limit
    assert 7_000 * 7_000 > MAX_PIXELS
    with pytest.raises(StripError, match=r"bomb.png is 7000x7000 pixels \(49 megapixels\), more than the 40"):
        open_image(bomb)
    row = {"strip": {"bytes": Path(bomb).read_bytes()}, "panel_boxes": [[0, 0, 10, 10]], "strip_id": "big"}
    with pytest.raises(StripError, match="strip big's image is 7000x7000"):
        strip_from_row(row, 0)
    huge = _bomb(tmp_path / "huge.png", 20_000, 20_000)  # PIL refuses this one itself, in Image.open
    with pytest.raises(StripError, match="huge.png is more than the 40 megapixels gaze opens"):
        open_image(huge)
    small = io.BytesIO()
    __import__("PIL.Image").Image.new("RGB", (12, 6)).save(small, format="PNG")
    row = {"strip": {"bytes": small.getvalue()}, "panel_boxes": [[0, 0, 6, 6], [6, 0, 12, 6]], "strip_id": "ok"}
    assert strip_from_row(row, 0).n_panels == 2


@pytest.mark.parametrize("boxes", [[[0, 0, 6]], [[0, 0, 6, "x"]], [None], "0,0,6,6", [], [[0, 0, 6, float("nan")]]])
def test_malformed_panel_boxes_are_one_line_errors(boxes):
    import io

    from PIL import Image

    from gaze.strips import StripError, strip_from_row

    png = io.BytesIO()
    Image.new("RGB", (12, 6)).save(png, format="PNG")
    with pytest.raises(StripError, match="strip s1: panel_boxes .* are not boxes x0,y0,x1,y1"):
        strip_from_row({"strip": {"bytes": png.getvalue()}, "panel_boxes": boxes, "strip_id": "s1"}, 0)


def test_folder_names_with_non_decimal_digits_and_missing_sources(tmp_path, monkeypatch):
    from PIL import Image

    from gaze.strips import StripError, iter_comic_folders, load_strips, panel_files

    for name in ("comic²", "comic10", "comic2"):
        (tmp_path / "comics" / name).mkdir(parents=True)
    assert [p.name for p in iter_comic_folders(tmp_path / "comics")] == ["comic²", "comic2", "comic10"]
    folder = tmp_path / "comics" / "comic2"
    for k in range(1, 7):
        Image.new("RGB", (4, 4)).save(folder / f"p{k}.png")
    Image.new("RGB", (4, 4)).save(folder / "p².png")
    assert len(panel_files(folder)) == 6
    monkeypatch.chdir(tmp_path)
    for source in ("strips/", "comics/nothing", "./strips", str(tmp_path / "nothing")):
        with pytest.raises(StripError, match="not found: no such folder or image here"):
            next(load_strips(source))


def test_api_errors_name_the_argument_and_the_flag(tmp_path):
    from datasets import Dataset, DatasetDict

    from gaze.strips import StripError, load_strips

    row = {"strip_id": ["a"], "x": [1]}
    DatasetDict({"train": Dataset.from_dict(row), "test": Dataset.from_dict(row)}).save_to_disk(tmp_path / "ds")
    with pytest.raises(StripError, match=r"choose one with split= \(--split\)"):
        next(load_strips(str(tmp_path / "ds")))
    with pytest.raises(StripError, match=r"no split 'eval'.*split= \(--split\)"):
        next(load_strips(str(tmp_path / "ds"), split="eval"))
    with pytest.raises(StripError, match=r"give start= and n_strips= \(--start, --n-strips\)"):
        next(load_strips(str(tmp_path / "ds"), split="train", n_strips=5))


@pytest.mark.parametrize("data, words", [
    ([[1.0]], "holds a JSON list"), ({"model_id": "m"}, "lacks the field(s) scores, matrices"),
    ({"model_id": "m", "scores": [[1.0, None]], "matrices": [], "n_strips": 1, "prompt": "q"}, "not a table of numbers"),
    ({"model_id": "m", "scores": [[1.0, 2.0]], "matrices": [[[[1.0]]]], "n_strips": 1, "prompt": "q"}, "do not match"),
    ({"model_id": "m", "scores": [1.0, 2.0], "matrices": [[[[1.0]]]], "n_strips": 1, "prompt": "q"}, "have shape [2]"),
    ({"model_id": "m", "scores": [[1.0, float("inf")]], "matrices": [[[[1.0]], [[1.0]]]], "n_strips": 1,
      "prompt": "q"}, "1 of its 2 scores are NaN or infinite"),
])
def test_a_broken_ranking_is_named_and_refused(data, words, tmp_path):
    import json

    from gaze.ranking import Ranking, RankingError

    path = tmp_path / "ranking.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RankingError, match=re.escape(words)) as e:
        Ranking.from_pretrained(path)
    assert str(path) in str(e.value) and "re-run `gaze discover`" in str(e.value)


def test_model_ids_are_compared_by_what_they_name(tmp_path, monkeypatch):
    from gaze.models import ORGANISM_DIR
    from gaze.ranking import Ranking, RankingError

    ranking = Ranking.load(ROOT / RANKING)
    assert ranking.model_id == "organism"
    for same in ("organism", str(ORGANISM_DIR), str(ORGANISM_DIR) + "/"):
        assert ranking.check(None, same) is ranking
    with pytest.raises(RankingError, match="made for 'organism', not 'other/model'.*gaze discover --model other/model"):
        ranking.check(None, "other/model")
    (tmp_path / "Qwen3-VL-2B-Instruct").mkdir()
    hub = Ranking(**{**ranking.__dict__, "model_id": "Qwen/Qwen3-VL-2B-Instruct"})
    assert hub.check(None, str(tmp_path / "Qwen3-VL-2B-Instruct")) is hub  # a local copy of the hub id
    with pytest.raises(RankingError):
        hub.check(None, "Qwen/Qwen3-VL-8B-Instruct")
