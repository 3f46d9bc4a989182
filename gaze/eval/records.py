"""The resumable record log (`records.jsonl`): one judged generation a line, keyed and hashed.

Every record carries the identity of the run that wrote it (a hash of the
settings that fix its content, `run_identity`), the content hash of the strip
it was generated from (`strip_hash`, added by `run_eval`) and a digest of its
own content (`digest`, added on append). A resumed run reuses a line only if
it parses, belongs to this run, says what its key says (protocol, condition,
strip, target, K), was not altered since it was written, and was made from the
very strip this run evaluates; every other line is named with the reason
("truncated", "stale", "swapped", "altered", "duplicate") and recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def record_key(protocol: str, condition: str, strip_id: str, target, k: int) -> str:
    return f"{protocol}|{condition}|{strip_id}|{target}|{k}"


def content_digest(data) -> str:
    """A short SHA-256 of JSON data (keys sorted): the identity of a run's settings, the digest of a record."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(manifest: dict) -> str:
    """The identity of a run: the digest of its manifest (`eval.json`), the settings that fix its records."""
    return content_digest(manifest)


def _digest(record: dict) -> str:
    return content_digest({k: v for k, v in record.items() if k != "digest"})


class RecordLog:
    """`records.jsonl`, one judged generation a line, keyed; appends are flushed line by line.

    Opening it drops lines that cannot be reused and rewrites the file if
    needed, so the missing records are recomputed; `problems` lists them as
    (line number, key or None, why). Lines that do not parse (an interrupted
    write) and duplicate keys are always dropped. With `identity` (a resumed
    run's `run_identity`), so are records of another run or of an older format
    (stale), records whose fields are not those their key names (swapped), and
    records whose content does not match their digest (altered).
    `drop_stale(strip_hashes)` then drops records made from other strip content.
    """

    def __init__(self, path: str | Path, identity: str | None = None):
        self.path = Path(path)
        self.identity = identity
        self.records: dict[str, dict] = {}
        self.problems: list[tuple[int, str | None, str]] = []
        self._line: dict[str, int] = {}  # key -> its line number in the file as opened
        if self.path.exists():
            raw = self.path.read_text(encoding="utf-8")
            for n, line in enumerate(raw.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    key = rec["key"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.problems.append((n, None, "truncated or broken: the line does not parse as a record"))
                    continue
                why = self._problem(rec) if identity is not None else None
                if why is None and key in self.records:
                    why = "duplicate of an earlier line"
                if why is not None:
                    self.problems.append((n, str(key), why))
                    continue
                self.records[key] = rec
                self._line[key] = n
            if self.problems or (raw and not raw.endswith("\n")):
                self._rewrite()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def dropped(self) -> int:
        return len(self.problems)

    def _problem(self, rec: dict) -> str | None:
        if not isinstance(rec, dict) or "digest" not in rec or "identity" not in rec:
            return "stale: written by an older version (no run identity or digest)"
        if rec["identity"] != self.identity:
            return "stale: written by a run with other settings"
        if rec["digest"] != _digest(rec):
            return "altered: its content differs from the digest recorded when it was written"
        try:
            own = record_key(rec["protocol"], rec["condition"], rec["strip_id"], rec["target"], rec["k"])
        except KeyError as e:
            return f"broken: no field {e}"
        if own != rec["key"]:
            return f"swapped: it holds {own}"
        return None

    def drop_stale(self, strip_hashes: dict[str, str]) -> int:
        """Drop records whose strip (by id) now has other content than they were made from; return how many."""
        stale = [key for key, rec in self.records.items()
                 if rec.get("strip_id") in strip_hashes and rec.get("strip_hash") != strip_hashes[rec["strip_id"]]]
        for key in stale:
            self.problems.append((self._line.get(key, 0), key,
                                  f"stale: strip {self.records[key]['strip_id']} has changed since"))
            del self.records[key]
        if stale:
            self._rewrite()
        return len(stale)

    def report(self, limit: int = 5) -> list[str]:
        """One line per dropped record (at most `limit`, then a count): the file, the line, the key and why."""
        lines = []
        for n, key, why in self.problems[:limit]:
            where = f"line {n}" if n else "a record"
            lines.append(f"{self.path}: {where}{f' ({key})' if key else ''} cannot be reused, {why}; recomputing it")
        if len(self.problems) > limit:
            lines.append(f"{self.path}: and {len(self.problems) - limit} more record(s) to recompute")
        return lines

    def rewrite(self, updated: dict[str, dict]) -> None:
        """Replace the records of these keys (changed content, e.g. a re-judge's verdicts), resealed, in one
        atomic rewrite of the file."""
        for key, record in updated.items():
            if key not in self.records:
                raise KeyError(key)
            if self.identity is not None:
                record = {**record, "identity": self.identity}
                record["digest"] = _digest(record)
            self.records[key] = record
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records.values()), encoding="utf-8")
        tmp.replace(self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict) -> None:
        if record["key"] in self.records:
            return
        if self.identity is not None:
            record = {**record, "identity": self.identity}
            record["digest"] = _digest(record)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        self.records[record["key"]] = record
