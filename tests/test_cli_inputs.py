"""Bad command-line input: one line naming the input and the fix, exit code 2, before any model is loaded."""

import pytest

from gaze.cli import main

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
