"""Read and write sentence-pair files: our TSV, XTREME's TSV, JSONL and parquet, from any fsspec URI.

Every reader returns :class:`PairExample` rows, so tasks and augmentation never see a format.

* ``tsv``: UTF-8, one header line naming the columns, tab-separated, **no quoting** (fields may
  hold literal ``"``), as in ``pawsx/{lang}/dev.tsv``. Columns are found by name:
  ``id``/``pairID``, ``sentence1``/``premise``, ``sentence2``/``hypothesis``, ``label``/``gold_label``;
  others (``promptID``, ``genre``) are ignored.
* ``xtreme``: XTREME's preprocessing output, written by ``csv.writer``: CRLF, ``""``-quoted fields,
  no header, no ids (the row number becomes the id), columns sentence1, sentence2[, label].
* ``jsonl``: one object per line with the same keys as the TSV header; ``parquet``: same columns.

A row with the wrong number of columns, an empty sentence or an unknown label is an error
naming the file and line, or, with ``skip_bad_rows``, is skipped and listed in
:attr:`ReadResult.skipped`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dist_robust.infra import storage
from dist_robust.config.run_config import DATA_FORMATS
from dist_robust.data.examples import PairExample

COLUMN_ALIASES = {
    "id": ("id", "pairID", "guid"),
    "sentence1": ("sentence1", "premise"),
    "sentence2": ("sentence2", "hypothesis"),
    "label": ("label", "gold_label"),
}


class DataFileError(ValueError):
    """A data file that cannot be read as labelled pairs; the message names the file (and line)."""


class MissingLabelsError(DataFileError):
    """The file has no label column (e.g. XTREME test files, ``test_unlabeled.tsv``)."""


class MissingDataFileError(DataFileError, FileNotFoundError):
    """An expected data file does not exist; the message lists what was found instead."""


@dataclass(frozen=True)
class LabelSet:
    """A task's labels: ``values`` as written in files, ``names`` for reports, same order.

    Integer labels (JSONL, parquet, the hub) are indices into that order.
    """

    values: tuple[str, ...]
    names: tuple[str, ...]

    def index(self, raw: Any) -> int | None:
        """The class index of a raw label, or None if it is not one of this task's labels."""
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw if 0 <= raw < len(self.values) else None
        text = str(raw).strip()
        return self.values.index(text) if text in self.values else None


PAWSX_LABELS = LabelSet(("0", "1"), ("not_paraphrase", "paraphrase"))
XNLI_LABELS = LabelSet(("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"))


@dataclass
class ReadResult:
    """The rows of one file and the bad rows skipped (``"file:line: reason"``)."""

    uri: str
    examples: list[PairExample]
    skipped: list[str] = field(default_factory=list)


class _Rows:
    """Collects rows of one file; a bad row raises or is recorded, as configured."""

    def __init__(self, uri: str, labels: LabelSet, lang: str, skip_bad_rows: bool):
        self.uri, self.labels, self.lang, self.skip = uri, labels, lang, skip_bad_rows
        self.result = ReadResult(uri, [])

    def bad(self, line: int | str, reason: str) -> None:
        message = f"{self.uri}:{line}: {reason}"
        if not self.skip:
            raise DataFileError(f"{message} (fix the file, or pass --skip-bad-rows to skip such rows)")
        self.result.skipped.append(message)

    def add(self, line: int | str, ex_id: Any, s1: Any, s2: Any, raw_label: Any) -> None:
        label = self.labels.index(raw_label)
        if label is None:
            accepted = ", ".join(self.labels.values)
            return self.bad(line, f"unknown label {raw_label!r}; accepted labels: {accepted}")
        for key, text in (("sentence1", s1), ("sentence2", s2)):
            if not isinstance(text, str) or not text.strip():
                return self.bad(line, f"empty or missing {key}")
        self.result.examples.append(PairExample(str(ex_id), s1, s2, label, self.lang, self.lang))


def read_pairs(uri: str, labels: LabelSet, lang: str = "en", fmt: str = "auto",
               skip_bad_rows: bool = False) -> ReadResult:
    """Labelled pairs of one file in any supported format (``fmt="auto"``: by extension and header)."""
    if fmt not in DATA_FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; accepted: {', '.join(DATA_FORMATS)}")
    if not storage.exists(uri):
        raise MissingDataFileError(f"{uri}: file not found")
    data = storage.read_bytes(uri)
    if not data.strip():
        raise DataFileError(f"{uri}: file is empty (expected sentence pairs)")
    fmt = detect_format(uri, data) if fmt == "auto" else fmt
    rows = _Rows(uri, labels, lang, skip_bad_rows)
    if fmt == "parquet":
        _parse_parquet(data, rows)
    else:
        text = _decode(uri, data)
        {"tsv": _parse_tsv, "xtreme": _parse_xtreme, "jsonl": _parse_jsonl}[fmt](text, rows)
    if not rows.result.examples:
        raise DataFileError(f"{uri}: no usable rows ({len(rows.result.skipped)} skipped as bad)")
    return rows.result


def detect_format(uri: str, data: bytes) -> str:
    """``parquet``/``jsonl`` by extension; a ``.tsv`` with a header naming sentence1 is ``tsv``, else ``xtreme``."""
    name = uri.lower().rstrip("/")
    if name.endswith(".parquet") or data[:4] == b"PAR1":
        return "parquet"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    first = data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace").split("\t")
    header_names = COLUMN_ALIASES["sentence1"] + COLUMN_ALIASES["sentence2"]
    return "tsv" if any(col in header_names for col in first) else "xtreme"


def _decode(uri: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFileError(f"{uri}:{line}: not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                            "re-encode the file as UTF-8") from None


def _columns(found: list[str], uri: str, where: str) -> dict[str, str]:
    """Our column name -> the name the file uses; sentence1 and sentence2 are required."""
    out = {}
    for key, aliases in COLUMN_ALIASES.items():
        hit = next((a for a in aliases if a in found), None)
        if hit is not None:
            out[key] = hit
    missing = [k for k in ("sentence1", "sentence2") if k not in out]
    if missing:
        raise DataFileError(f"{uri}:{where}: no {' or '.join(missing)} column; found columns {found}; "
                            f"expected names: {COLUMN_ALIASES}")
    return out


def _require_labels(cols: dict[str, str], found: list[str], uri: str) -> None:
    if "label" not in cols:
        raise MissingLabelsError(f"{uri}: no label column (found {found}); unlabelled files cannot be "
                                 "trained or evaluated on")


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) without the line break; a final empty line is dropped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines, start=1):
        yield i, line.rstrip("\r")


def _parse_tsv(text: str, rows: _Rows) -> None:
    lines = _lines(text)
    _, head = next(lines)
    header = head.split("\t")
    cols = _columns(header, rows.uri, "1")
    _require_labels(cols, header, rows.uri)
    pos = {key: header.index(name) for key, name in cols.items()}
    for line_no, line in lines:
        fields = line.split("\t")
        if len(fields) != len(header):
            rows.bad(line_no, f"{len(fields)} tab-separated column(s), the header has {len(header)}")
            continue
        ex_id = fields[pos["id"]] if "id" in pos else line_no - 1
        rows.add(line_no, ex_id, fields[pos["sentence1"]], fields[pos["sentence2"]], fields[pos["label"]])
    if not rows.result.examples and not rows.result.skipped:
        raise DataFileError(f"{rows.uri}: has a header but no rows")


_XTREME_FIELD_LIMIT = 1 << 24  # 16 MiB: csv's default 128 KiB fails on long (or runaway-quoted) fields


def _parse_xtreme(text: str, rows: _Rows) -> None:
    csv.field_size_limit(max(csv.field_size_limit(), _XTREME_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    width = None
    index = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # a field over the limit: an unclosed quote swallowing the rest of the file
            raise DataFileError(f"{rows.uri}:{reader.line_num}: not a readable XTREME (csv-quoted) file ({e}); an "
                                f"unclosed quote? Files with literal quotes are plain TSV: --data-format tsv") from None
        line_no = reader.line_num
        if width is None:
            width = len(fields)
            if width == 2:
                raise MissingLabelsError(f"{rows.uri}: XTREME file without a label column (2 columns: "
                                         "sentence1, sentence2); XTREME strips test labels")
        # The id is the row's position (XTREME keeps no ids; translations align by position), so a
        # skipped row still takes its number: otherwise every later id shifts and mixed-language pairs mispair.
        index += 1
        if len(fields) != 3:
            rows.bad(line_no, f"{len(fields)} column(s); XTREME pair files have 3: sentence1, sentence2, label")
            continue
        rows.add(line_no, index - 1, fields[0], fields[1], fields[2])


def _parse_jsonl(text: str, rows: _Rows) -> None:
    cols = None
    for line_no, line in _lines(text):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.bad(line_no, f"not valid JSON ({e.msg})")
            continue
        except RecursionError:
            rows.bad(line_no, "JSON nested too deeply to be a row")
            continue
        if not isinstance(obj, dict):
            rows.bad(line_no, f"expected a JSON object, got {type(obj).__name__}")
            continue
        if cols is None:
            cols = _columns(list(obj), rows.uri, str(line_no))
            _require_labels(cols, list(obj), rows.uri)
        if cols["label"] not in obj:
            rows.bad(line_no, f"no {cols['label']!r} key")
            continue
        ex_id = obj.get(cols.get("id", ""), line_no - 1)
        rows.add(line_no, ex_id, obj.get(cols["sentence1"]), obj.get(cols["sentence2"]), obj[cols["label"]])


def _parse_parquet(data: bytes, rows: _Rows) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowInvalid as e:
        raise DataFileError(f"{rows.uri}: not a readable parquet file ({e})") from None
    found = table.column_names
    cols = _columns(found, rows.uri, "schema")
    _require_labels(cols, found, rows.uri)
    values = {key: table.column(name).to_pylist() for key, name in cols.items()}
    for i in range(table.num_rows):
        ex_id = values["id"][i] if "id" in values else i
        rows.add(f"row {i}", ex_id, values["sentence1"][i], values["sentence2"][i], values["label"][i])


def write_pairs(uri: str, examples: list[PairExample], labels: LabelSet) -> None:
    """Write pairs as our TSV (``.tsv``) or JSONL (``.jsonl``); labels as the task writes them."""
    if uri.endswith(".jsonl"):
        lines = [json.dumps({"id": e.id, "sentence1": e.sentence1, "sentence2": e.sentence2,
                             "label": labels.values[e.label]}, ensure_ascii=False) for e in examples]
        storage.write_text(uri, "\n".join(lines) + "\n")
        return
    if not uri.endswith(".tsv"):
        raise ValueError(f"{uri}: cannot tell the output format; end the name in .tsv or .jsonl")
    lines = ["id\tsentence1\tsentence2\tlabel"]
    for e in examples:
        fields = (e.id, e.sentence1, e.sentence2, labels.values[e.label])
        if any("\t" in f or "\n" in f for f in fields):
            raise ValueError(f"example {e.id!r} has a tab or line break in a field; our TSV has no quoting, "
                             "write .jsonl instead")
        lines.append("\t".join(fields))
    storage.write_text(uri, "\n".join(lines) + "\n")
