"""The run's record: ``OUT/metrics.jsonl``, one JSON object per training step or evaluation.

Training records hold the step's loss exactly (JSON keeps every bit of a float), so two runs can
be compared bit for bit. Written by rank 0 only and flushed per record: a crash loses at most
the record being written, and a resumed run drops the records after its checkpoint.
"""

from __future__ import annotations

import json
import os

FILENAME = "metrics.jsonl"


class MetricsError(ValueError):
    """A line of the metrics file is not a record."""


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("kind"), str)
    return record if ok else None


def read(path: str, upto: int) -> list[dict]:
    """The records of ``path`` up to step ``upto``, skipping a last line cut short by a kill.

    Raises MetricsError for any other line that is not a record.
    """
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsError(f"{path} cannot be read ({type(e).__name__})") from None
    keep = []
    for number, line in enumerate(lines, 1):
        record = _record(line)
        if record is None:
            if number == len(lines):
                break  # cut short by a kill
            raise MetricsError(f"{path} line {number} is not a metrics record: {line[:60]!r}")
        if record["step"] <= upto:
            keep.append(record)
    return keep


class MetricsLog:
    """Appends records to ``path`` (when ``enabled``) and keeps them in ``records`` for the plots."""

    def __init__(self, path: str, records: list[dict], enabled: bool):
        self.records = list(records)
        self._file = None
        if enabled:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(tmp, path)
            self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
