"""The README's "Use" section runs as written: its commands and Python snippets, and the README's datagen commands.

The commands run in a temporary folder, offline, on the bundled organism, through the same entry points as
the console scripts (`gaze` = `gaze.cli:main`, `python -m datagen` = `datagen.cli:main`, `python -c` = exec),
with their strip counts made small; the counts as written are checked to fit the splits datagen makes.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SMALL = {"datagen": 8, "discover": 2, "eval": 1}  # --n-strips each tool runs with here


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """Each command line of a bash block (continuations joined, comments dropped) as argv."""
    joined = block.replace("\\\n", " ")
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def _tool(argv: list[str]) -> str:
    if argv[:3] == ["python", "-m", "datagen"]:
        return "datagen"
    if argv[0] == "gaze":
        return argv[1]
    return argv[0]


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _small(argv: list[str]) -> list[str]:
    tool = _tool(argv)
    if tool in SMALL and "--n-strips" in argv:
        i = argv.index("--n-strips") + 1
        argv = [*argv[:i], str(min(int(argv[i]), SMALL[tool])), *argv[i + 1:]]
    return argv


USE = _section("Use")
COMMANDS = [argv for block in _blocks(USE, "bash") for argv in _commands(block)]
INLINE_DATAGEN = [shlex.split(c) for c in re.findall(r"`(python -m datagen generate [^`]*--out [^`]*)`", README)]


def test_the_use_section_shows_the_venv_splits_and_writes_nothing_tracked():
    assert COMMANDS[0] == ["source", ".venv/bin/activate"]
    tools = [_tool(a) for a in COMMANDS]
    assert tools.index("datagen") < tools.index("discover") < tools.index("steer")
    discover = COMMANDS[tools.index("discover")]
    assert _flag(discover, "--split"), "datagen writes two splits: gaze discover needs --split"
    for argv in COMMANDS:
        for flag in ("--out", "--trajectory-out"):
            if _flag(argv, flag):
                assert not _flag(argv, flag).startswith(("reports", "gaze/")), f"{argv} writes into a tracked folder"
    # every image a command reads is written by a command before it
    for i, argv in enumerate(COMMANDS):
        if _flag(argv, "--image"):
            assert any(_flag(argv, "--image") in " ".join(before) for before in COMMANDS[:i]), argv


def test_the_counts_as_written_fit_the_splits_datagen_makes():
    from datagen.dataset import split_sizes
    from datagen.run import GenerateConfig

    tools = [_tool(a) for a in COMMANDS]
    made, discover = COMMANDS[tools.index("datagen")], COMMANDS[tools.index("discover")]
    split = _flag(discover, "--split")
    assert _flag(discover, "--strips") == _flag(made, "--out")
    n = int(_flag(made, "--n-strips"))
    sizes = split_sizes(n, GenerateConfig().eval_fraction)
    assert int(_flag(discover, "--n-strips")) <= sizes[split], (sizes, discover)
    assert SMALL["discover"] <= split_sizes(SMALL["datagen"], GenerateConfig().eval_fraction)[split]
    # the comment says what datagen makes
    assert f"{n} synthetic" in USE and f"discovery ({sizes['discovery']} strips)" in USE
    assert f"evaluation ({sizes['evaluation']} strips)" in USE


def _run(argv: list[str]) -> None:
    tool = _tool(argv)
    if tool == "source":
        return
    if tool == "datagen":
        from datagen.cli import main as datagen_main

        assert datagen_main(argv[3:]) == 0, argv
    elif argv[0] == "gaze":
        from gaze.cli import main as gaze_main

        assert gaze_main(argv[1:]) == 0, argv
    elif argv[:2] == ["python", "-c"]:
        exec(compile(argv[2], "<README python -c>", "exec"), {})
    else:
        pytest.fail(f"the README's Use section runs {argv[0]!r}, which this test does not know")


def test_the_use_section_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv in COMMANDS:
        _run(_small(argv))
    for made in ("runs/organism/ranking.json", "runs/strip.png", "runs/traj.json", "runs/eval/aggregate.json",
                 "runs/eval/README.md"):
        assert (tmp_path / made).exists(), made
    snippets = _blocks(USE, "python")
    assert len(snippets) == 2
    scope: dict = {}
    for code in snippets:  # the second snippet goes on from the first one's names
        exec(compile(code, "<README python>", "exec"), scope)
    assert isinstance(scope["out"].text, str) and scope["strip"].n_panels == 6
    assert "steered" in capsys.readouterr().out


@pytest.mark.parametrize("argv", INLINE_DATAGEN, ids=[" ".join(a[3:5]) for a in INLINE_DATAGEN])
def test_the_readmes_datagen_commands_run(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(_small(argv))
    assert (tmp_path / _flag(argv, "--out")).is_dir()


def _recipe() -> list[list[str]]:
    """The organism recipe's commands in the README, its shell variables expanded, as train's argv."""
    block = _blocks(_section("The model organism (what runs by default)"), "bash")[0]
    variables = dict(re.findall(r'^(\w+)="(.*?)"', block, flags=re.S | re.M))
    block = re.sub(r'^\w+=".*?"\n', "", block, flags=re.S | re.M)
    for name, value in variables.items():
        block = block.replace(f"${name}", " ".join(value.split()))
    commands = _commands(block)
    assert all(argv[:3] == ["python", "-m", "gaze.organism.train"] for argv in commands), commands
    return [argv[3:] for argv in commands]


def test_the_organism_recipe_as_written_is_the_one_the_shipped_weights_record():
    """Each README command parses to exactly the config its stage recorded (the shipped training.json, its
    `init_record` chain and its towers' records), so the commands as written reproduce the shipped organism."""
    import json
    from dataclasses import asdict

    from gaze.organism.train import parse_args

    record = json.loads((ROOT / "gaze/organism/weights/training.json").read_text())
    chain = [record]
    while "init_record" in chain[-1]:
        chain.append(chain[-1]["init_record"])
    while "tower" in chain[-1]:
        chain.append(chain[-1]["tower"])
    recipe = _recipe()
    assert len(recipe) == len(chain) >= 6
    paths = ("init", "vision_from", "tower_from")
    for argv, stage in zip(recipe, reversed(chain)):
        written, recorded = asdict(parse_args(argv, check=False)[0]), stage["config"]
        for key, value in recorded.items():
            if key in paths:  # the folders are named differently; which stage starts from one is not
                assert bool(written[key]) == bool(value), (argv, key)
            else:
                assert written[key] == value, (argv, key, written[key], value)
