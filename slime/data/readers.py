"""Stream rows out of prompt files (`.jsonl` / `.parquet`), each tagged with where it came from.

    python -c "from slime.data.readers import iter_rows; print(next(iter_rows('data/train.jsonl')))"

Rows are yielded one at a time, so a large file is never held as raw text. Every row comes with a
location string (`data/train.jsonl:17` for line 17, `data/train.parquet:row 3` for the 4th row) that the
dataset loader puts into every error message. A path may end with `@[start:end]` to keep only that
slice of rows (Python slice semantics, no step), as in the original slime.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
_SLICE_RE = re.compile(r"^(?P<path>.+)@\[(?P<start>-?\d*):(?P<end>-?\d*)\]$")


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    location: str  # "path/file.jsonl:12" (1-based line) or "path/file.parquet:row 11" (0-based row)
    ordinal: int  # 0-based position among the rows of the file


def split_row_slice(spec: str) -> tuple[str, slice | None]:
    """`data.jsonl@[10:20]` -> ("data.jsonl", slice(10, 20)); a plain path -> (path, None)."""
    match = _SLICE_RE.match(spec)
    if not match:
        return spec, None
    start = int(match["start"]) if match["start"] else None
    end = int(match["end"]) if match["end"] else None
    return match["path"], slice(start, end)


def iter_rows(spec: str, *, flag: str = "--prompt-data") -> Iterator[Row]:
    """Yield every row of a `.jsonl` or `.parquet` file (optionally `path@[start:end]`)."""
    path, row_slice = split_row_slice(spec)
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: file not found: {path}")
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        rows = _iter_jsonl(path)
    elif lower.endswith(PARQUET_SUFFIXES):
        rows = _iter_parquet(path)
    else:
        raise ValueError(f"{flag}: {path} is neither .jsonl nor .parquet")
    if row_slice is None:
        yield from rows
        return
    if (row_slice.start or 0) < 0 or (row_slice.stop is not None and row_slice.stop < 0):
        # negative bounds need the row count: materialise only the (small) Row objects
        all_rows = list(rows)
        yield from all_rows[row_slice]
        return
    start = row_slice.start or 0
    for row in rows:
        if row_slice.stop is not None and row.ordinal >= row_slice.stop:
            return
        if row.ordinal >= start:
            yield row


def _iter_jsonl(path: str) -> Iterator[Row]:
    ordinal = 0
    with open(path, "rb") as f:  # binary, so a bad byte is blamed on its own line
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # tolerate a BOM
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object per line, got {type(data).__name__}")
            yield Row(data=data, location=f"{path}:{line_no}", ordinal=ordinal)
            ordinal += 1


def _iter_parquet(path: str, batch_size: int = 1024) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    ordinal = 0
    for batch in parquet.iter_batches(batch_size=batch_size):
        for data in batch.to_pylist():
            yield Row(data=data, location=f"{path}:row {ordinal}", ordinal=ordinal)
            ordinal += 1
