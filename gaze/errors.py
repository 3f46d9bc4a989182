"""The project's own error type: a mistake the user can fix, with a message that says how.

Every module raises a subclass of `GazeError` (a `ValueError`, so callers that
catch `ValueError` keep working) for bad input: a strip that cannot be read, a
region with no image token, a ranking for another model, an unknown score
variant. The `gaze` command prints such an error as one line and exits with
status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class GazeError(ValueError):
    """Bad input or settings; the message names the fix."""


class ModelNotFoundError(GazeError, FileNotFoundError):
    """No model at the given name, folder or hub id (reachable from this machine)."""


class SteeringError(GazeError):
    """A steering request that cannot be applied (bad heads, target, schedule, mode or phase)."""
