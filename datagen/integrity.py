"""What makes a long datagen job safe to interrupt, resume and share a disk with.

- `atomic_write` / `atomic_path`: a file appears complete or not at all
  (written under a temporary name in the same folder, then `os.replace`d).
- Shard records: beside every work shard `X.parquet`, `X.parquet.json` holds
  what the shard was made from (a hash of the run's settings and format
  version, its split and strip range) and the size and SHA-256 of its bytes.
  Resume trusts a shard only if its record exists, names the same settings
  and place, and the bytes hash to the recorded value; otherwise it names the
  file and why ("swapped", "altered", "truncated", "stale", no record) and
  recomputes it.
- `output_lock`: one process per output folder (`datagen.lock` holds the
  holder's pid and host); a lock left by a dead process is taken over.
- `check_writable` and `safe_name`: bad output paths and names that would
  write outside the output folder are refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from datagen.story import DatagenError
from gaze.errors import check_writable as _check_writable

log = logging.getLogger("datagen")

LOCK = "datagen.lock"
RECORD_SUFFIX = ".json"  # shard X.parquet -> record X.parquet.json


# ---------------------------------------------------------------- atomic writes

@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` only if the block ends normally."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


# ---------------------------------------------------------------- shard records

def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def identity_key(identity: dict) -> str:
    """A short hash of the settings that decide a run's content (with the format version in them)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_path(shard: Path) -> Path:
    return shard.with_name(shard.name + RECORD_SUFFIX)


def write_record(shard: Path, identity: str, place: dict) -> None:
    """Record, once the shard itself is written, what it was made from and the hash of its bytes."""
    atomic_write(record_path(shard), json.dumps(
        {"identity": identity, **place, "bytes": shard.stat().st_size, "sha256": file_digest(shard)},
        indent=1, sort_keys=True))


def _read_record(shard: Path) -> dict | str:
    """The shard's record, or why it cannot be read."""
    path = record_path(shard)
    if not path.exists():
        return "it has no record (written by an interrupted or older run)"
    try:
        record = json.loads(path.read_text())
        if not all(k in record for k in ("identity", "bytes", "sha256")):
            raise KeyError("identity, bytes or sha256")
        return record
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its record {path.name} is unreadable ({e})"


def _place(record: dict) -> str:
    return f"{record.get('split')} strips {record.get('start')}..{record.get('stop')}"


def verified_shards(expected: dict[Path, dict], identity: str) -> set[Path]:
    """The shards (path -> place: split, start, stop) that exist and can be trusted, for a run of `identity`.

    Every other existing shard is named in a warning with the reason (no
    record, stale, swapped, truncated, altered) and removed, so that it is
    recomputed. Hashes every existing shard once.
    """
    records = {shard: _read_record(shard) for shard in expected if shard.exists()}
    owner = {r["sha256"]: shard for shard, r in records.items() if isinstance(r, dict)}
    good = set()
    for shard, place in expected.items():
        if not shard.exists():
            record_path(shard).unlink(missing_ok=True)
            continue
        record = records[shard]
        if isinstance(record, str):
            problem = record
        elif record["identity"] != identity:
            problem = f"stale: made for other settings or an older format ({_place(record)})"
        elif any(record.get(k) != v for k, v in place.items()):
            problem = f"swapped: its record says it holds {_place(record)}, not {_place(place)}"
        else:
            digest, size = file_digest(shard), shard.stat().st_size
            other = owner.get(digest)
            if digest == record["sha256"] and size == record["bytes"]:
                problem = None
            elif other is not None and other != shard:
                problem = f"swapped: it holds the strips of {other.name}"
            elif size < record["bytes"]:
                problem = f"truncated: {size} of {record['bytes']} bytes"
            else:
                problem = "altered: its bytes differ from the hash recorded when it was written"
        if problem is None:
            good.add(shard)
            continue
        log.warning("%s cannot be reused, %s; recomputing it", shard, problem)
        shard.unlink()
        record_path(shard).unlink(missing_ok=True)
    return good


# ---------------------------------------------------------------- the output lock

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `out/datagen.lock` (pid and host of this process) for the block; refuse a folder another process holds.

    Creates `out` if needed (and removes it again if the block leaves it
    holding nothing but the lock). A lock whose process is gone on this host
    is taken over, with a warning.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = None, None
            if pid is not None and host == me["host"] and not _alive(pid) and attempt == 0:
                log.warning("%s was locked by process %d, which is gone; taking the lock over", out, pid)
                path.unlink(missing_ok=True)
                continue
            who = f"process {pid} on {host}" if pid is not None else "another process"
            raise DatagenError(f"{out} is in use by {who} (lock file {path}); wait for it to finish, give another "
                               f"--out, or delete {path} if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()


# ---------------------------------------------------------------- paths

def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output path that cannot become a writable folder (naming `flag` and the fix):
    `gaze.errors.check_writable`, the one check every command line makes, raising `DatagenError`."""
    _check_writable(path, flag, error=DatagenError)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def safe_name(name: str, what: str) -> str:
    """`name` if it is one plain path component (letters, digits, . _ -; no separators, no '..'), else an error."""
    text = str(name)
    if not _NAME.fullmatch(text) or ".." in text:
        raise DatagenError(f"{what} {text!r} is not a plain folder name (it could write outside the output folder); "
                           "fix it in the dataset (letters, digits, '.', '_', '-' only)")
    return text
