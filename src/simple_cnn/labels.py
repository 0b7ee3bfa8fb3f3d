"""A labels file: one row per image, its path inside the dataset and its label(s).

The layout Kaggle and most published datasets use beside class folders::

    path,label,split,group
    train/0001.jpg,cat,train,owner-17
    train/0002.jpg,cat|dog,,owner-17

The path column is the first of :data:`PATH_COLUMNS` the header names (else the first
column), the label column the first of :data:`LABEL_COLUMNS` (else the first column that
is not the path, split or group, unless the columns are one-hot: :func:`_one_hot_columns`).
A path cell that names no file is looked for by name, or by its end (:class:`ByName`). An
optional ``split`` column (``train``, ``val`` or ``test``: ``splits.SPLIT_WORDS``; or
fastai's ``is_valid``) is followed as given; an optional ``group`` column keeps images
together in one split (``splits.py``). Several labels per image: a ``|``-separated cell,
or, with ``--multi_label``, several rows for one path. The file is read with Python's
``csv`` module (quoted fields, commas inside quotes, Windows line ends), separated by
commas, or by the semicolons or tabs its header line holds; UTF-8 (a byte-order mark is
dropped) or UTF-16 with its byte-order mark. Rows that cannot be used are skipped and
counted with their reasons, like unreadable images.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, UsageError, printable
from .files import read_regular
from .images import image_files
from .splits import split_named

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_path", "filepath", "image_id", "image_name", "id")
LABEL_COLUMNS = ("label", "labels", "class", "classes", "tags", "category", "target")
# Images of one patient or subject are one unit of the split: across splits, a test score would reward
# recognising the patient, not the finding.
GROUP_COLUMNS = ("group", "group_id", "patient_id", "patient", "subject_id", "subject")
# fastai's labels files mark validation rows in a column is_valid (True or False) rather than a split column.
SPLIT_COLUMNS = ("split", "is_valid")
IS_VALID = {"true": "val", "1": "val", "yes": "val", "false": "train", "0": "train", "no": "train"}
LABEL_SEPARATOR = "|"
MAX_LABELS_BYTES = 1 << 30  # a million rows of long paths is about 100 MB
EXAMPLES_KEPT = 20  # skipped rows listed by name; the rest are counted by reason
ONE_HOT = {"0", "1", "0.0", "1.0"}  # the cells of a one-hot label column (:func:`_one_hot_columns`)
ONE_HOT_SAMPLE = 1000  # the rows that decide whether a file's label columns are one-hot
# How workbooks start: a zip (.xlsx, .ods, .numbers) or an OLE2 file (.xls); a text file never does.
WORKBOOKS = (b"PK\x03\x04", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")


@dataclass
class LabelRow:
    relpath: str
    labels: tuple[str, ...]
    split: str | None = None  # from the split column, as given
    group: str | None = None  # from the group column


@dataclass
class SkippedRows:
    """Rows that could not be used: counted by reason, the first few kept with their line numbers."""

    count: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, line: int, reason: str) -> None:
        self.count += 1
        self.reasons[reason.split(" (")[0]] += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(f"line {line}: {reason}")

    def as_dict(self) -> dict:
        return {"count": self.count, "reasons": dict(self.reasons.most_common()), "examples": self.examples}

    def summary(self) -> str:
        """e.g. '3 labels rows skipped (2 no such file, 1 empty label; line 4: ...)', or ''."""
        if not self.count:
            return ""
        why = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common(4))
        return f"{self.count} labels row{'s' if self.count != 1 else ''} skipped ({why}; {self.examples[0]})"


@dataclass
class LabelsFile:
    path: Path
    sha256: str
    rows: list[LabelRow]
    multi_label: bool
    has_split: bool
    has_group: bool
    skipped: SkippedRows

    @property
    def class_names(self) -> list[str]:
        return sorted({label for row in self.rows for label in row.labels})

    def record(self) -> dict:
        """What a model keeps of the file: its name, hash and size, to find and check it again."""
        return {"name": self.path.name, "sha256": self.sha256, "rows": len(self.rows), "has_split": self.has_split}


def read_labels_file(path, root: Path, multi_label: bool | None = None) -> LabelsFile:
    """Read and check ``path`` against the dataset folder ``root``; ``multi_label`` None: decided
    by the file (a ``|`` in a label cell)."""
    path = Path(path)
    content = _read_bytes(path)
    text = _text(content, path)
    records = _records(csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text, path)), path)
    header = next(records, (1, None, 1))[1]
    columns = _columns(header, path)
    sample = list(itertools.islice(records, ONE_HOT_SAMPLE))
    one_hot = _one_hot_columns(header, columns, [row for _, row, _ in sample])
    _say_columns(path, header, columns, one_hot)
    by_name = ByName(os.fspath(root))
    flags = "split" in columns and header[columns["split"]].strip().lower() == "is_valid"
    raw = list(_rows(itertools.chain(sample, records), columns, one_hot, root, by_name, flags))
    for line in by_name.summary(path):
        log.info(line)
    separator = LABEL_SEPARATOR
    if multi_label is not False and _tags_by_spaces(header, columns, one_hot, raw):
        log.info(f"the tags of {path} are separated by spaces: each is a label")
        separator = None  # str.split's whitespace
    if multi_label is None:
        multi_label = any(relpath is not None and len(cell.split(separator)) > 1 for _, (relpath, cell, _, _) in raw)
    skipped = SkippedRows()
    rows = _merged(raw, multi_label, skipped, separator)
    if not rows:
        raise UsageError(f"the labels file {path} holds no usable row ({skipped.summary() or 'it is empty'}): check its paths")
    found = LabelsFile(
        path, hashlib.sha256(content).hexdigest(), rows, multi_label, "split" in columns, "group" in columns, skipped
    )
    if len(found.class_names) < 2:
        raise UsageError(
            f"the labels file {path} names fewer than two labels ({', '.join(found.class_names)}): a classifier needs two"
            + (f"; {skipped.summary()}" if skipped.count else "")
        )
    return found


def _text(content: bytes, path: Path) -> str:
    """The file as text: UTF-8 (a byte-order mark dropped), or UTF-16 if it starts with that byte-order mark
    (what spreadsheets save as "Unicode text")."""
    if content.startswith(WORKBOOKS):
        raise UsageError(
            f"the labels file {path} is a spreadsheet workbook, not text: save it as CSV (in Excel: File > Save As > "
            "CSV UTF-8) and give --labels that file"
        )
    utf16 = content.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        return content.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as e:
        what = "UTF-16 text" if utf16 else "UTF-8 text"
        raise UsageError(f"the labels file {path} is not {what} (byte {e.start}): save it as UTF-8 CSV") from None


def _delimiter(text: str, path: Path) -> str:
    """A tab for a .tsv or .tab file; else the first of comma, semicolon and tab that the header line holds
    (spreadsheets where a comma is the decimal mark save CSV with semicolons), a comma if none."""
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    header = text.split("\n", 1)[0]
    return next((d for d in (",", ";", "\t") if d in header), ",")


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise UsageError(f"--labels {path}: no such file")
    try:
        return read_regular(path, MAX_LABELS_BYTES)
    except DataError as e:
        raise UsageError(f"--labels: {e}") from None


def _columns(header: list[str] | None, path: Path) -> dict[str, int]:
    """The column index of path, label and (if present) split and group, from the header row."""
    if not header or len(header) < 2:
        raise UsageError(
            f"the labels file {path} needs a header row with at least two columns, e.g. 'path,label' "
            f"(found {printable(','.join(header or []))[:80]!r})"
        )
    names = [h.strip().lower() for h in header]
    columns = {"path": next((names.index(c) for c in PATH_COLUMNS if c in names), 0)}
    if (split := next((names.index(c) for c in SPLIT_COLUMNS if c in names), None)) is not None:
        columns["split"] = split
    group = next((names.index(c) for c in GROUP_COLUMNS if c in names), None)
    if group is not None and group not in columns.values() and len(names) - len(columns) > 1:  # one left for the label
        columns["group"] = group
    others = [i for i in range(len(names)) if i not in columns.values()]
    columns["label"] = next((names.index(c) for c in LABEL_COLUMNS if c in names), others[0] if others else columns["path"])
    if columns["path"] == columns["label"]:
        raise UsageError(f"the labels file {path}: the path and the label are the same column ({header[columns['path']]!r})")
    return columns


def _names_a_label(header: list[str]) -> bool:
    """Does the header name a label column (one of :data:`LABEL_COLUMNS`, in any case)?"""
    return any(h.strip().lower() in LABEL_COLUMNS for h in header)


def _say_columns(path: Path, header: list[str], columns: dict[str, int], one_hot: list) -> None:
    """Say which columns were taken where the header did not name them plainly."""
    if one_hot:
        log.info(f"the labels of {path} are its one-hot columns {', '.join(printable(name) for _, name in one_hot)}")
    elif len(header) > 2 and not _names_a_label(header):
        log.warning(
            f"the labels file {path} names no label column ({', '.join(LABEL_COLUMNS)}): its column "
            f"{printable(header[columns['label']])!r} is taken as the label"
        )
    if "group" in columns and (name := header[columns["group"]]).strip().lower() != "group":
        log.info(f"the images of {path} are grouped by its column {printable(name)!r}: a group stays in one split")


def _one_hot_columns(header: list[str], columns: dict[str, int], sample: list[list[str]]) -> list[tuple[int, str]]:
    """(index, class) of each label column of a one-hot file (Kaggle's ``image_id,healthy,rust,scab`` with a 1
    under each image's class): where no column is named as the label, two or more columns besides the path,
    split and group, and in nine in ten of the first rows ``sample`` or more, each of their cells is a 0 or a 1
    (the rest are skipped and counted as rows). Else none."""
    if _names_a_label(header):
        return []
    others = [i for i in range(len(header)) if i not in (columns["path"], columns.get("split"), columns.get("group"))]
    rows = [row for row in sample if len(row) == len(header)]
    binary = sum({row[i].strip() for i in others} <= ONE_HOT for row in rows)
    if len(others) < 2 or not rows or binary < 0.9 * len(rows):
        return []
    return [(i, header[i].strip()) for i in others]


def _tags_by_spaces(header: list[str], columns: dict[str, int], one_hot: list, raw: list) -> bool:
    """Is the label column named ``tags``, with its labels separated by spaces (Planet's ``image_name,tags``:
    ``haze primary``): some kept cell holds a space and none a ``|``? A column named ``label`` or ``class``
    keeps its spaces: one class may be called ``red rose``."""
    if one_hot or header[columns["label"]].strip().lower() != "tags":
        return False
    cells = [cell for _, (relpath, cell, _, _) in raw if relpath is not None]
    return any(" " in cell.strip() for cell in cells) and not any(LABEL_SEPARATOR in cell for cell in cells)


def _label_cell(row: list[str], columns: dict[str, int], one_hot: list[tuple[int, str]]) -> tuple[str, str | None]:
    """The row's label cell (several labels joined by LABEL_SEPARATOR), or why it has none."""
    if not one_hot:
        return row[columns["label"]], None
    cells = [row[i].strip() for i, _ in one_hot]
    bad = next((c for c in cells if c not in ONE_HOT), None)
    if bad is not None:
        return "", f"a one-hot cell that is neither 0 nor 1 ({printable(bad)[:20]})"
    return LABEL_SEPARATOR.join(name for (_, name), c in zip(one_hot, cells) if float(c) == 1), None


def _records(reader, path: Path):
    """(first line, cells) of each CSV record. A record that Python's csv cannot read (a field over its
    size limit: what a quote that is never closed makes of the rest of a large file) is one line."""
    while True:
        line = reader.line_num + 1  # a quoted field may run over several lines: the record's first
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UsageError(
                f'the labels file {path} cannot be read from line {line} on ({e}): look there for a quote (") '
                "that is never closed"
            ) from None
        yield line, row, reader.line_num - line + 1


class ByName:
    """The one image a path cell names that is not found as written, looked for among the dataset's image files:

    - by name, as Kaggle's ``id`` columns give it (``0001`` for ``train/0001.jpg``): the image whose path ends
      with the cell, with or without the file's suffix;
    - else by its end, for a path written from another folder or machine (``xrays/images/1.jpg`` from the
      project's folder, ``../images/1.jpg`` from the labels file's, ``C:/Users/ana/flowers/roses/1.jpg``,
      Colab's ``/content/drive/...``, the host's path of a Docker volume): the image with the longest path
      inside the dataset that the cell ends with.

    Only files found under the dataset are ever chosen. The dataset is walked once, at the first cell not
    found as written."""

    KINDS = {"name": "without its folder or suffix, found by name", "path": "by a path from elsewhere, found by its end"}

    def __init__(self, folder: str):
        self.folder = folder
        self.found: Counter = Counter()  # rows found, by kind
        self.examples: dict[str, tuple[str, str]] = {}  # the first (cell, image found) of each kind
        self._index: dict[str, list[str]] | None = None

    def matches(self, cell: str) -> tuple[list[str], str]:
        """The images the cell may name, and how they were found (a key of :data:`KINDS`)."""
        if self._index is None:
            self._index = defaultdict(list)
            for file in image_files(Path(self.folder)):
                rel = file.relative_to(self.folder).as_posix()
                name = rel.rsplit("/", 1)[-1]
                self._index[name].append(rel)
                self._index[name.rsplit(".", 1)[0]].append(rel)
        candidates = self._index.get(cell.rsplit("/", 1)[-1], ())
        if named := [rel for rel in candidates if not is_absolute(cell) and _names(rel, cell)]:
            return named, "name"
        return sorted((rel for rel in candidates if cell.endswith("/" + rel)), key=len)[-1:], "path"

    def note(self, cell: str, rel: str, kind: str) -> None:
        self.examples.setdefault(kind, (printable(cell)[:60], printable(rel)[:60]))
        self.found[kind] += 1

    def summary(self, path: Path) -> list[str]:
        return [
            f"{n} row{'s' if n > 1 else ''} of {path} name an image {self.KINDS[kind]} ({cell}: {rel})"
            for kind, n in sorted(self.found.items())
            for cell, rel in [self.examples[kind]]
        ]


def is_absolute(cell: str) -> bool:
    """Is this path cell (``/`` separators) absolute, on any system: ``/home/...``, ``C:/...``, ``//server/...``?"""
    return cell.startswith("/") or (len(cell) > 2 and cell[0].isalpha() and cell[1:3] == ":/")


def _names(rel: str, cell: str) -> bool:
    """Does the path cell ``cell`` name the image file ``rel``: its end, whole names only, with or without the suffix?"""
    return any(p == cell or p.endswith("/" + cell) for p in (rel, rel.rsplit(".", 1)[0]))


def _found_by_name(relpath: str, reason: str, by_name: ByName, real_root: Path) -> tuple[str, str | None]:
    """A path cell not found as written, looked for by name: (the image's path, why it cannot be used or None)."""
    matches, kind = by_name.matches(relpath)
    if len(matches) > 1:
        return relpath, f"a name several images share ({printable(relpath)[:60]}: {len(matches)} files)"
    if not matches:
        return relpath, reason
    by_name.note(relpath, matches[0], kind)
    return matches[0], _path_problem(matches[0], by_name.folder, real_root)


def _rows(records, columns: dict[str, int], one_hot: list[tuple[int, str]], root: Path, by_name: ByName, flags: bool):
    """(line, (relpath, label cell, split, group)) of each row, or the reason it is skipped as the cell.
    ``flags``: the split column is fastai's is_valid (:data:`IS_VALID`)."""
    width = max([*columns.values(), *(i for i, _ in one_hot)]) + 1
    folder = os.fspath(root)  # strings, not Paths: a labels file may hold a million rows
    real_root = Path(os.path.realpath(folder))
    for line, row, lines in records:
        if not any(cell.strip() for cell in row):
            continue  # blank lines
        if lines > 1:  # no path or label holds a line end: a quote left open has swallowed the rows after it
            yield line, (None, f'a row over several lines ({lines}: a quote " opened there and never closed?)', None, None)
            continue
        if len(row) < width:
            yield line, (None, f"{len(row)} fields, the header has {width} or more", None, None)
            continue
        relpath = _tidied(row[columns["path"]].strip().replace("\\", "/"))
        reason = _path_problem(relpath, folder, real_root)
        if reason is not None and reason.startswith(("no such file", "a path outside the dataset")):
            relpath, reason = _found_by_name(relpath, reason, by_name, real_root)
        split = row[columns["split"]].strip() if "split" in columns else ""
        split = IS_VALID.get(split.lower(), split) if flags else split
        if reason is None and split and split_named(split) is None:
            reason = f"unknown split {printable(split)[:20]!r} (train, val or test)"
        group = row[columns["group"]].strip() if "group" in columns else ""
        cell, label_problem = _label_cell(row, columns, one_hot)
        if reason is not None or label_problem is not None:
            yield line, (None, reason or label_problem, None, None)
        else:
            yield line, (relpath, cell, split_named(split), group or None)


def _tidied(relpath: str) -> str:
    """The path without ``.`` and empty parts (``./images//1.jpg`` is ``images/1.jpg``), so that it names its
    image as class folders would: its split's hash, and one image listed twice, depend on it."""
    if "//" not in relpath and "./" not in relpath and not relpath.endswith("/") and relpath != ".":
        return relpath  # most cells: a labels file may hold a million
    tidy = "/".join(part for part in relpath.split("/") if part not in ("", "."))
    return "/" + tidy if relpath.startswith("/") else tidy


def _path_problem(relpath: str, folder: str, real_root: Path) -> str | None:
    """Why ``relpath`` cannot be used as an image of the dataset at ``folder`` (``real_root``
    with its links resolved), or None."""
    if not relpath:
        return "an empty path"
    shown = printable(relpath)
    if shown != relpath:
        return f"a path with a control character ({shown[:60]})"
    if relpath.startswith("/") or ".." in relpath.split("/"):
        return f"a path outside the dataset ({shown[:60]})"
    full = os.path.join(folder, relpath)
    if not os.path.isfile(full):
        return f"no such file ({shown[:60]})"
    if not Path(os.path.realpath(full)).is_relative_to(real_root):
        return f"a link to a file outside the dataset ({shown[:60]})"
    return None


def _labels_of(cell: str, separator: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.strip() for p in cell.split(separator) if p.strip()))


def _merged(raw, multi_label: bool, skipped: SkippedRows, separator: str | None) -> list[LabelRow]:
    """One row per path: several rows of a path are joined (multi-label) or must agree (single-label)."""
    by_path: dict[str, LabelRow] = {}
    first_line: dict[str, int] = {}
    refused: set[str] = set()
    for line, (relpath, cell, split, group) in raw:
        if relpath is None:
            skipped.add(line, cell)
            continue
        labels = _labels_of(cell, separator)
        bad = next((label for label in labels if printable(label) != label), None)
        if not labels or bad is not None:
            skipped.add(line, "an empty label" if not labels else f"a label with a control character ({printable(bad)[:40]})")
            continue
        if not multi_label and len(labels) > 1:
            skipped.add(line, f"several labels for one image ({printable(cell)[:40]}): --multi_label accepts them")
            continue
        if relpath in refused:
            skipped.add(line, f"listed with conflicting labels or splits ({printable(relpath)[:60]})")
            continue
        before = by_path.get(relpath)
        if before is None:
            by_path[relpath], first_line[relpath] = LabelRow(relpath, labels, split, group), line
        elif before.split != split or before.group != group or (not multi_label and before.labels != labels):
            refused.add(relpath)
            del by_path[relpath]
            for where in (first_line[relpath], line):  # neither row can be trusted
                skipped.add(where, f"listed with conflicting labels or splits ({printable(relpath)[:60]})")
        elif multi_label:
            before.labels = tuple(dict.fromkeys(before.labels + labels))
        else:
            skipped.add(line, f"listed twice ({printable(relpath)[:60]})")
    return list(by_path.values())
