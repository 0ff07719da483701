"""Labelled images listed in a table, as hospitals and dataset releases publish them.

Two sources read as a table instead of class folders:

* a **labels CSV** (``--data labels.csv``): one row per image, with a path column (``path``,
  ``relative_path``, ``image``, ``file`` or ``filename``; relative to the CSV's folder) and a label
  column (``label``, ``class`` or ``pathology``), and optionally ``patient`` (or ``patient_id``,
  ``case``), ``site``, ``box`` (or ``bbox``: ``x,y,w,h`` in pixels, brackets allowed), ``birads``
  (or ``bi-rads``, ``bi_rads``), ``scanner`` (or ``device``) and ``split`` columns. Column names
  are matched without regard to case. BrEaST's ``labels.csv`` is such a table.
* the **BUS-BRA release** (a folder holding ``bus_data.csv`` and ``Images/``): ``ID`` names the
  image ``Images/<ID>.png``, ``Pathology`` the label, ``Case`` the patient (views of one lesion
  share it), ``BIRADS`` the readers' category, ``Device`` the scanner and ``BBOX`` the box.

Rows are returned as :class:`TableRow`; :mod:`busdx.data.datasets` turns them into samples.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from busdx.data.imaging import Box
from busdx.errors import DataError

__all__ = ["BUS_BRA_TABLE", "TableRow", "is_table_source", "read_table"]

BUS_BRA_TABLE = "bus_data.csv"

_COLUMNS = {  # role -> accepted column names, in order of preference
    "path": ("path", "relative_path", "image", "file", "filename"),
    "label": ("label", "class", "pathology"),
    "patient": ("patient", "patient_id", "case"),
    "site": ("site",),
    "box": ("box", "bbox"),
    "birads": ("birads", "bi-rads", "bi_rads"),
    "scanner": ("scanner", "device"),
    "split": ("split",),
}
_BUS_BRA_COLUMNS = {
    "path": "id",
    "label": "pathology",
    "patient": "case",
    "birads": "birads",
    "scanner": "device",
    "box": "bbox",
}


@dataclass(frozen=True)
class TableRow:
    """One image of a table: where it is and what the table says of it."""

    path: Path  # absolute
    label: str  # lower-case class name as written in the table
    patient: str | None = None
    site: str | None = None
    box: Box | None = None
    birads: str | None = None
    scanner: str = ""
    split: str | None = None


def is_table_source(source: Path) -> bool:
    """Whether ``source`` is a labels CSV or a folder in the BUS-BRA release layout."""
    if source.is_file():
        return source.suffix.lower() in {".csv", ".tsv"}
    return (source / BUS_BRA_TABLE).is_file() and (source / "Images").is_dir()


def _parse_box(text: str, where: str) -> Box | None:
    text = text.strip().strip("[]()")
    if not text:
        return None
    try:
        x, y, w, h = (round(float(part)) for part in text.replace(";", ",").split(","))
    except ValueError as exc:
        raise DataError(f"{where}: box {text!r} is not x,y,w,h") from exc
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: box {text!r} has no area")
    return (x, y, w, h)


def _pick(fields: Sequence[str], role: str) -> str | None:
    lowered = {name.strip().lower(): name for name in fields}
    return next((lowered[name] for name in _COLUMNS[role] if name in lowered), None)


def read_table(source: str | Path) -> tuple[Path, list[TableRow]]:
    """The folder that the table's paths are relative to, and its rows.

    Raises :class:`DataError` naming the file and row for a missing column, an empty label, an
    unreadable box or an image file that does not exist.
    """
    source = Path(source).expanduser().resolve()
    if source.is_dir():
        table, root = source / BUS_BRA_TABLE, source
        columns = None  # resolved below from the release's own names
    else:
        table, root = source, source.parent
        columns = {}
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    with table.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        fields = reader.fieldnames or []
        if columns is None:
            lowered = {name.strip().lower(): name for name in fields}
            columns = {role: lowered.get(name) for role, name in _BUS_BRA_COLUMNS.items()}
        else:
            columns = {role: _pick(fields, role) for role in _COLUMNS}
        missing = [role for role in ("path", "label") if columns.get(role) is None]
        if missing:
            accepted = "; ".join(f"{role}: {', '.join(_COLUMNS[role])}" for role in missing)
            raise DataError(f"{table} has no {' or '.join(missing)} column (accepted: {accepted})")
        rows = [_row(record, columns, root, source.is_dir(), f"{table}:{number}")
                for number, record in enumerate(reader, start=2)]  # fmt: skip
    if not rows:
        raise DataError(f"{table} lists no images")
    return root, rows


def _row(record: dict, columns: dict, root: Path, bus_bra: bool, where: str) -> TableRow:
    def value(role: str) -> str:
        name = columns.get(role)
        return (record.get(name) or "").strip() if name else ""

    name = value("path")
    path = root / "Images" / f"{name}.png" if bus_bra else root / name
    if not name or not path.is_file():
        raise DataError(f"{where}: image {name!r} not found under {root}")
    label = value("label").lower()
    if not label:
        raise DataError(f"{where}: {name} has no label")
    return TableRow(
        path=path,
        label=label,
        patient=value("patient") or None,
        site=value("site") or None,
        box=_parse_box(value("box"), where),
        birads=value("birads") or None,
        scanner=value("scanner"),
        split=value("split").lower() or None,
    )
