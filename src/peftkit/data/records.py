"""Reading training data from disk into a list of plain dict records.

Supported: JSON Lines (``.jsonl``/``.ndjson``), JSON (a list of objects, or an object of equal-length
column lists), CSV/TSV with or without a header row, and a local Hugging Face ``datasets`` directory
written by ``save_to_disk`` (the ``datasets`` package is optional and only imported for that case).

Every problem with a file (missing, empty, malformed line, unknown column) is a :class:`ConfigError`
that names the file, the line and, for columns, the closest existing column.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, did_you_mean

JSONL_EXTS = (".jsonl", ".ndjson")
JSON_EXTS = (".json",)
DELIMITED_EXTS = {".csv": ",", ".tsv": "\t"}
# Files written by datasets' save_to_disk: a Dataset holds state.json + dataset_info.json, a DatasetDict holds dataset_dict.json.
_DATASETS_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")

_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")


def load_records(path: str | Path, columns: dict[str, str] | None = None, has_header: bool | None = None) -> list[dict]:
    """Read ``path`` into a list of dicts, one per example.

    Args:
        path: a ``.jsonl``, ``.json``, ``.csv`` or ``.tsv`` file, or a ``datasets`` directory saved with ``save_to_disk``.
        columns: renames ``{wanted_name: column_in_file}``, e.g. ``{"text": "sentence"}``; for files without a
            header the columns are named by position: ``{"text": "0", "label": "1"}``. Other columns are kept.
        has_header: for CSV/TSV, whether the first row holds column names; detected when ``None``.

    Raises:
        ConfigError: missing or empty file, unknown format, malformed line (with its number), or a ``columns``
            entry naming a column the file does not have (with the closest existing one).
    """
    p = Path(path)
    if not p.exists():
        hint = ""
        if p.parent.is_dir():
            hint = did_you_mean(p.name, [c.name for c in p.parent.iterdir()])
        raise ConfigError(f"data file not found: {str(p)!r}{hint}")
    if p.is_dir():
        records = _read_datasets_dir(p)
    else:
        ext = p.suffix.lower()
        if p.stat().st_size == 0:
            raise ConfigError(f"data file {str(p)!r} is empty")
        if ext in JSONL_EXTS:
            records = _read_jsonl(p, _read_text(p))
        elif ext in JSON_EXTS:
            records = _read_json(p)
        elif ext in DELIMITED_EXTS:
            records = _read_delimited(p, DELIMITED_EXTS[ext], has_header, columns)
        else:
            known = ", ".join((*JSONL_EXTS, *JSON_EXTS, *DELIMITED_EXTS))
            raise ConfigError(f"unknown data format {ext or '(no extension)'!r} of {str(p)!r}; "
                              f"supported: {known}, or a datasets directory saved with save_to_disk")
    if not records:
        raise ConfigError(f"data file {str(p)!r} holds no records")
    if columns:
        records = rename_columns(records, columns, source=str(p))
    return records


def rename_columns(records: list[dict], columns: dict[str, str], source: str = "the data") -> list[dict]:
    """Copy of ``records`` with ``columns`` (``{wanted: existing}``) renamed; an unknown column is a ConfigError."""
    present: dict[str, None] = {}
    for r in records:
        present.update(dict.fromkeys(r))
    for wanted, col in columns.items():
        if str(col) not in present:
            raise ConfigError(f"column {str(col)!r} (for {wanted!r}) not found in {source}{did_you_mean(str(col), present)}; "
                              f"columns present: {', '.join(map(repr, present))}")
    out = []
    for r in records:
        r = dict(r)
        moved = {wanted: r.pop(str(col)) for wanted, col in columns.items() if str(col) in r and wanted != str(col)}
        r.update(moved)
        out.append(r)
    return out


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data file {str(p)!r} is not UTF-8 text ({e})") from None


def _read_jsonl(p: Path, text: str) -> list[dict]:
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{lineno}: invalid JSON on line {lineno} ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{p}:{lineno}: line {lineno} is a JSON {type(obj).__name__}, expected an object")
        records.append(obj)
    return records


def _read_json(p: Path) -> list[dict]:
    text = _read_text(p)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a JSON Lines file named .json, as datasets' to_json writes by default
            return _read_jsonl(p, text)
        raise ConfigError(f"{p}:{e.lineno}: invalid JSON on line {e.lineno} ({e.msg}, column {e.colno})") from None
    if isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(x, dict) for x in next(iter(lists.values()))):
            obj = next(iter(lists.values()))  # {"data": [{...}, ...]}
        elif lists and len(lists) == len(obj) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))  # columnar: {"text": [...], "label": [...]}
            obj = [{k: v[i] for k, v in lists.items()} for i in range(n)]
    if not isinstance(obj, list):
        raise ConfigError(f"{p}: expected a JSON list of objects (or JSON Lines), found a JSON {type(obj).__name__}")
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise ConfigError(f"{p}: item {i} of the JSON list is a {type(r).__name__}, expected an object")
    return obj


def _read_delimited(p: Path, delimiter: str, has_header: bool | None, columns: dict[str, str] | None) -> list[dict]:
    text = _read_text(p)
    # GLUE-style TSV files are unquoted and may contain stray '"' in the text: only honour quotes when a field
    # visibly starts with one. CSV always follows the usual quoting rules (quoted commas, doubled quotes).
    quoting = csv.QUOTE_MINIMAL
    if delimiter == "\t":
        head = text[:65536]
        if not (head.startswith('"') or '\t"' in head or '\n"' in head):
            quoting = csv.QUOTE_NONE
    rows_with_lines: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    try:
        for row in reader:
            if row and any(c.strip() for c in row):
                rows_with_lines.append((reader.line_num, row))
    except csv.Error as e:
        raise ConfigError(f"{p}:{reader.line_num}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} line ({e})") from None
    if not rows_with_lines:
        raise ConfigError(f"data file {str(p)!r} holds no rows")
    rows = [r for _, r in rows_with_lines]
    if has_header is None:
        has_header = _detect_header(rows, columns)
    if has_header:
        names = [c.strip() for c in rows[0]]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes or not all(names):
            raise ConfigError(f"{p}:1: header row has {'duplicate' if dupes else 'empty'} column names {dupes or names}; "
                              "pass has_header=False if the file has no header")
        body = rows_with_lines[1:]
    else:
        names = [str(i) for i in range(len(rows[0]))]
        body = rows_with_lines
    records = []
    for lineno, row in body:
        if len(row) != len(names):
            raise ConfigError(f"{p}:{lineno}: line {lineno} has {len(row)} fields, expected {len(names)} "
                              f"({', '.join(names)})")
        records.append(dict(zip(names, row, strict=True)))
    return records


def _detect_header(rows: list[list[str]], columns: dict[str, str] | None) -> bool:
    """Whether the first row is a header: decided by ``columns`` when it names columns, else by the cell types."""
    first, rest = rows[0], rows[1:101]
    if columns:
        wanted = {str(c) for c in columns.values()}
        if wanted <= {c.strip() for c in first}:
            return True
        if all(c.isdigit() for c in wanted):
            return False
    # A column that is numeric in every later row but not in the first row: the first row is a header.
    for j, cell in enumerate(first):
        col = [r[j] for r in rest if j < len(r)]
        if col and not _NUMBER.match(cell) and all(_NUMBER.match(c) for c in col):
            return True
    # Otherwise: every first-row cell looks like a column name, and some later cell does not look like one.
    if not all(_IDENTIFIER.match(c.strip()) for c in first) or len(set(first)) != len(first):
        return False
    if any(_NUMBER.match(c) for c in first):
        return False
    return any(not _IDENTIFIER.match(c.strip()) for r in rest for c in r)


def _read_datasets_dir(p: Path) -> list[dict[str, Any]]:
    if not any((p / m).exists() for m in _DATASETS_MARKERS):
        raise ConfigError(f"{str(p)!r} is a directory but not a Hugging Face datasets directory saved with save_to_disk "
                          f"(none of {', '.join(_DATASETS_MARKERS)} in it); give a .jsonl/.json/.csv/.tsv file instead")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading the datasets directory {str(p)!r} needs the optional package 'datasets': "
                          "pip install datasets") from None
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise ConfigError(f"{str(p)!r} holds several splits ({', '.join(splits)}); give one of them, "
                              f"e.g. {str(p / splits[0])!r}")
        ds = ds[splits[0]]
    return [dict(r) for r in ds]
