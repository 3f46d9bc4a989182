"""`python -m datagen TOOL ...`: the command line, one frozen config dataclass per tool.

    generate  synthesise strips into a dataset folder (resumable)    -> GenerateConfig, datagen.run.run
    import    comicN/p1.png..p6.png folders -> a dataset folder      -> ImportConfig, datagen.run.import_folders
    import-comics  COMICS windows (gaze.comics) -> a dataset folder  -> ImportComicsConfig, datagen.run.import_comics
    export    a dataset -> comicN/ folders                           -> ExportConfig, datagen.dataset.export_folders
    push      upload a finished dataset folder to the Hub            -> PushConfig, datagen.dataset.push_to_hub

Flags are the config fields with dashes (`n_strips` -> `--n-strips`); booleans
come in pairs (`--letters` / `--no-letters`). Bad input prints one line that
says what to change, and exits with status 2 before any work; Ctrl-C prints one
line saying what was kept and how to resume, and exits with status 130; a bug
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from datasets import DatasetDict, load_dataset, load_from_disk

from gaze.strips import StripError
from datagen.dataset import export_folders, push_to_hub
from datagen.integrity import check_writable
from datagen.run import (GenerateConfig, ImportComicsConfig, ImportConfig, import_comics, import_folders, kept, opt,
                         run)
from datagen.story import DatagenError


@dataclass(frozen=True)
class ExportConfig:
    """`python -m datagen export`: write a dataset's strips as comicN/p1.png..p6.png + captions.json."""

    dataset: str | None = opt(None, "a datagen output folder, a save_to_disk folder, or a Hub dataset id")
    out: str | None = opt(None, "new or empty folder for the comicN/ folders")


@dataclass(frozen=True)
class PushConfig:
    """`python -m datagen push`: upload README.md and data/*.parquet of a finished dataset folder."""

    dataset: str | None = opt(None, "a finished datagen output folder")
    repo: str | None = opt(None, "Hub dataset repo, OWNER/NAME (token in HF_TOKEN)")
    private: bool = opt(False, "create the repo as private")


TOOLS = {"generate": GenerateConfig, "import": ImportConfig, "import-comics": ImportComicsConfig,
         "export": ExportConfig, "push": PushConfig}
REQUIRED = {"generate": ("out",), "import": ("folders", "out"), "import-comics": ("comics", "out"),
            "export": ("dataset", "out"),
            "push": ("dataset", "repo")}
_TYPES = {"int": int, "float": float, "str": str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datagen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="tool", required=True)
    for tool, cls in TOOLS.items():
        p = sub.add_parser(tool, help=cls.__doc__.split(": ", 1)[1], description=cls.__doc__)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = str(f.type).split("|")[0].strip()  # "int | None" -> "int"
            default = None if f.default is MISSING else f.default
            if kind == "bool":
                p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=f.metadata["help"])
            else:
                p.add_argument(flag, dest=f.name, type=_TYPES[kind], default=default, help=f.metadata["help"],
                               required=f.name in REQUIRED[tool])
    return parser


def open_dataset(source: str) -> DatasetDict:
    """A DatasetDict from a datagen output folder, a save_to_disk folder, or anything `load_dataset` reads."""
    path = Path(source)
    try:
        if (path / "disk").is_dir():
            return load_from_disk(str(path / "disk"))
        if (path / "dataset_dict.json").exists():
            return load_from_disk(str(path))
        return load_dataset(source)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DatagenError(f"cannot open dataset {source!r}: {e}; give a datagen output folder or a Hub id") from None


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    tool = args.pop("tool")
    config = TOOLS[tool](**args)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        if tool == "generate":
            dsd = run(config)
            print(f"{config.out}: " + ", ".join(f"{s} {len(ds)} strips" for s, ds in dsd.items()))
        elif tool in ("import", "import-comics"):
            dsd = (import_folders if tool == "import" else import_comics)(config, progress=True)
            print(f"{config.out}: " + ", ".join(f"{s} {len(ds)} strips" for s, ds in dsd.items()))
        elif tool == "export":
            check_writable(Path(config.out), "--out")
            folders = export_folders(open_dataset(config.dataset), config.out, progress=True)
            print(f"{config.out}: {len(folders)} comic folders")
        else:
            push_to_hub(config.dataset, config.repo, private=config.private)
            print(f"uploaded {config.dataset} to https://huggingface.co/datasets/{config.repo}")
    except (DatagenError, StripError) as e:  # bad input or state: one line that says what to change
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted(tool, config)}", file=sys.stderr)
        return 130
    return 0


def interrupted(tool: str, config) -> str:
    """What an interrupted tool kept, and how to go on."""
    if tool == "generate":
        return f"{kept(config.out)}; rerun the same command to resume"
    if tool in ("import", "import-comics"):
        return "the source folders are untouched; rerun the same command to import them again"
    if tool == "export":
        done = sum(1 for p in Path(config.out).glob("comic*") if p.is_dir()) if config.out else 0
        return f"{done} complete comic folders were written to {config.out}; delete it and rerun to export again"
    return "the upload stopped (files already on the Hub stay there); rerun the same command to upload again"
