"""The project's own error type: a mistake the user can fix, with a message that says how.

Every module raises a subclass of `GazeError` (a `ValueError`, so callers that
catch `ValueError` keep working) for bad input: a strip that cannot be read, a
region with no image token, a ranking for another model, an unknown score
variant. The `gaze` command prints such an error as one line and exits with
status 2; any other exception is a bug and keeps its traceback.

The checks of user-given paths that every command line (`gaze`, `datagen`)
makes before any work live here too, light (no torch): `check_writable` (an
output folder or file that can be written) and `is_hub_id` (whether a name
that is no local path can be a Hub repo id at all).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


class GazeError(ValueError):
    """Bad input or settings; the message names the fix."""


class ModelNotFoundError(GazeError, FileNotFoundError):
    """No model at the given name, folder or hub id (reachable from this machine)."""


class SteeringError(GazeError):
    """A steering request that cannot be applied (bad heads, target, schedule, mode or phase)."""


def check_writable(path: str | Path, flag: str, *, file: bool = False, error: type[Exception] = GazeError) -> None:
    """Refuse, before any work, an output path that cannot be written, naming `flag` and the fix.

    `file=False`: `path` must be (or become) a folder; `file=True`: a file (its
    folder is created). Refused: a file where a folder is expected (and the
    reverse), a path under a file, a place this process cannot write to.
    Raises `error` (datagen passes its own error type).
    """
    path = Path(path)
    kind = "a file path" if file else "a folder"
    if path.exists() and file and path.is_dir():
        raise error(f"{flag} {path} is a folder; give {flag} {kind} (a new file or one to overwrite)")
    if path.exists() and not file and not path.is_dir():
        raise error(f"{flag} {path} is a file; give {flag} a folder (new or empty)")
    probe = path.parent if file else path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise error(f"{flag} {path} lies under the file {probe}; give {flag} {kind} you can write to")
    if file and path.exists() and not os.access(path, os.W_OK):
        raise error(f"{flag} {path}: the file is read-only; give {flag} {kind} you can write to")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gaze-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = "a folder" if not file else "a file path"
        raise error(f"{flag} {path}: cannot write in {probe} ({e.strerror or e}); give {flag} {where} you can write to") \
            from None


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(name: str | Path) -> bool:
    """Whether `name`, which is no existing local path, can be a Hub repo id OWNER/NAME.

    Not one: anything with more or fewer than one '/', a trailing '/', a path
    starting with '.', '/' or '~', or a name whose first part is a local folder
    (`runs/organism` when `runs/` exists is a local folder that is missing).
    """
    text = str(name)
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not Path(text.split("/")[0]).is_dir()
