"""The resumable record log (`records.jsonl`): one judged generation a line, keyed."""

from __future__ import annotations

import json
from pathlib import Path

def record_key(protocol: str, condition: str, strip_id: str, target, k: int) -> str:
    return f"{protocol}|{condition}|{strip_id}|{target}|{k}"


class RecordLog:
    """`records.jsonl`, one judged generation a line, keyed; appends are flushed line by line.

    Opening it drops lines that do not parse (an interrupted write) and duplicate
    keys, rewriting the file if needed, so the missing records are recomputed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.dropped = 0
        if self.path.exists():
            raw = self.path.read_text(encoding="utf-8")
            for line in raw.splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    key = rec["key"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.dropped += 1
                    continue
                if key in self.records:
                    self.dropped += 1
                    continue
                self.records[key] = rec
            if self.dropped or (raw and not raw.endswith("\n")):
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records.values()), encoding="utf-8")
                tmp.replace(self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict) -> None:
        if record["key"] in self.records:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        self.records[record["key"]] = record
