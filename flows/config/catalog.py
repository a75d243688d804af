"""Catalogs: the jobs of a batch (YAML, CSV or Parquet), validated row by row.

A catalog lists jobs: an id, a source clip, optional masks, the edit mode and its input (an edited first
frame, an instruction, a reference image or a sketch), a prompt, a seed and per-stage overrides. Paths are
relative to the catalog file. YAML catalogs may carry ``defaults:`` merged into every row::

    defaults:
      params: {ingest: {n_frames: 16}}
    jobs:
      - id: bear-elephant
        source: ../tests/data/bear/frames
        masks: ../tests/data/bear/mask-00000.png
        first_frame: ../tests/data/bear/edited-first-frame-elephant.png
        prompt: an elephant walking on the rocks in a zoo

CSV/Parquet columns are the same field names; ``<stage>.<param>`` columns set parameters and
``backend.<stage>`` columns set backends. A bad row does not stop the catalog: it becomes a
:class:`RowError` naming its line and field, and the other rows run. A job id belongs to the first row that
has it: a later row with the same id (or one differing only in case, which would share an output folder on
macOS) fails, naming both lines, and the first runs.

Catalogs are untrusted text: YAML is refused at load, before anything is built from it, when it is larger
than 64 MiB, nested deeper than 64 levels or would expand (aliases counted every time they are used) to more
than 2 million nodes (:mod:`flows.config.safe_yaml`): a "billion laughs" file of a kilobyte fails at once
instead of growing to gigabytes in the code that walks it.

A catalog file is streamed: :func:`load_catalog` checks the whole file and counts its rows, holding none of
them; :meth:`Catalog.stream` reads the file again and validates row after row, so planning a 10,000-row
catalog holds about what a 100-row one does (the duplicate-id check keeps one id and line per row).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.config.catalog_yaml import YamlCatalogError, scan_yaml, yaml_rows
from flows.config.safe_yaml import MAX_YAML_BYTES, UnsafeYaml, safe_yaml

EditMode = Literal["provided", "instruction", "reference", "sketch", "inpaint"]

# The edit stage's backend for each mode (a row's ``backends: {edit: ...}`` overrides it).
EDIT_MODE_BACKENDS: dict[str, str] = {
    "provided": "provided",
    "instruction": "instructpix2pix",
    "reference": "paint-by-example",
    "sketch": "sketch",
    "inpaint": "sd-inpaint",
}
# The external array each mode hands to the edit stage.
EDIT_MODE_INPUTS: dict[str, str | None] = {
    "provided": "first_frame_image",
    "instruction": None,
    "reference": "reference_image",
    "sketch": "sketch_image",
    "inpaint": None,
}
PATH_FIELDS = ("source", "masks", "first_frame", "reference", "sketch", "shape")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CatalogError(ValueError):
    """The catalog file as a whole cannot be read (missing, unparseable, wrong shape)."""


class Job(BaseModel):
    """One edit: validated, with paths resolved against the catalog's folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    source: Path
    masks: Path | None = None
    mode: EditMode | None = None
    first_frame: Path | None = None
    instruction: str | None = None
    reference: Path | None = None
    sketch: Path | None = None
    shape: Path | None = Field(None, description="optional mask of the edited shape (provided_shape)")
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0)
    fps: float | None = Field(None, gt=0, le=1000, description="a frame folder's frame rate (a video: its own); "
                                                              "default 16")
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    backends: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Job:
        if not _ID.match(self.id):
            raise ValueError(f"id: {_printable(self.id, 60)!r} is not a job id: use letters, digits, '.', '_' and "
                             "'-' (max 128, no leading punctuation)")
        mode = self.mode or self.inferred_mode()
        if mode is None:
            raise ValueError("no edit input: give first_frame, instruction, reference or sketch (or mode)")
        needs = {"provided": "first_frame", "instruction": "instruction", "reference": "reference",
                 "sketch": "sketch", "inpaint": "prompt"}[mode]
        if not getattr(self, needs):
            raise ValueError(f"mode {mode!r} needs field {needs!r}")
        if mode != self.mode:
            object.__setattr__(self, "mode", mode)
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not value.exists():
                raise ValueError(f"{name}: no such file or folder: {value}")
        return self

    def inferred_mode(self) -> EditMode | None:
        for mode, given in (("provided", "first_frame"), ("sketch", "sketch"), ("reference", "reference"),
                            ("instruction", "instruction")):
            if getattr(self, given):
                return mode  # type: ignore[return-value]
        return None

    @property
    def edit_backend(self) -> str:
        return self.backends.get("edit") or EDIT_MODE_BACKENDS[self.mode or "provided"]

    def stage_backends(self) -> dict[str, str]:
        """The row's backend choices, with the edit mode's backend for the edit stage."""
        return {"edit": self.edit_backend, **self.backends}

    def common_params(self) -> dict[str, Any]:
        """Job-level values given to every stage whose parameters have a field of that name."""
        out: dict[str, Any] = {"prompt": self.prompt}
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        if self.seed is not None:
            out["seed"] = self.seed
        if self.instruction is not None:
            out["instruction"] = self.instruction
        return out


@dataclass(frozen=True)
class RowError:
    """A row that failed validation: reported as a failed job, the others still run."""

    job_id: str
    where: str  # "catalogs/x.yaml line 12"
    field: str
    message: str

    def __post_init__(self) -> None:
        # User text (a bad id, a path) reaches the terminal: one printable line of bounded length.
        for name, limit in (("job_id", 80), ("field", 80), ("message", 600)):
            object.__setattr__(self, name, _printable(getattr(self, name), limit))

    def __str__(self) -> str:
        return f"{self.where}, field {self.field!r}: {self.message}"


def _printable(text: str, limit: int) -> str:
    """``text`` with control characters escaped (no terminal escape sequences, one line), cut to ``limit``."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


Rows = Callable[[], Iterator[tuple[str, dict[str, Any]]]]  # a file's (where, row) pairs, read afresh per call
Where = str | None


class Catalog:
    """A catalog's entries in file order: a file re-read (and validated) each time it is streamed, or entries
    held in memory (``v2v edit``'s one job, a flow's payload, :func:`build_catalog`)."""

    def __init__(self, path: Path | None, entries: list[Job | RowError] | None = None,
                 wheres: Mapping[str, str] | None = None, *, rows: Rows | None = None, base: Path | None = None,
                 defaults: Mapping[str, Any] | None = None, count: int = 0) -> None:
        self.path = path
        self._rows, self.base, self.defaults = rows, base or Path.cwd(), dict(defaults or {})
        self._entries = None if rows is not None else list(entries or ())  # a file's: read when asked for
        self._wheres = dict(wheres or {})  # job id -> "file line N" of a valid row
        self._count = count if rows is not None else len(self._entries or ())

    def stream(self) -> Iterator[tuple[Where, Job | RowError]]:
        """``(where, entry)`` pairs in file order, each row validated as it is read (a file is read again on
        every call; memory holds one row, plus an id and line per row for the duplicate check)."""
        if self._rows is None:
            for entry in self._entries or ():
                yield (entry.where if isinstance(entry, RowError) else self._wheres.get(entry.id)), entry
            return
        check = _Checker(self.base, self.defaults)
        try:
            for i, (where, row) in enumerate(self._rows()):
                yield where, check.entry(i, where, row)
        except YamlCatalogError as exc:  # the file changed since load (CSV and Parquet raise CatalogError)
            raise CatalogError(str(exc)) from None

    def __len__(self) -> int:
        """Rows in the catalog (known at load, before any row is validated)."""
        return self._count

    def __bool__(self) -> bool:  # a catalog is an object, not an empty container, even with no rows
        return True

    def _materialised(self) -> list[Job | RowError]:
        # Kept once read: callers of entries/jobs/errors/where want the whole list (reports, small catalogs).
        if self._entries is None:
            pairs = list(self.stream())
            self._wheres = {e.id: w for w, e in pairs if isinstance(e, Job) and w is not None}
            self._entries = [e for _, e in pairs]
        return self._entries

    @property
    def entries(self) -> list[Job | RowError]:
        """Every entry in file order (a file catalog is read whole, and kept: use :meth:`stream` to plan)."""
        return self._materialised()

    def where(self, job_id: str) -> str | None:
        """Where a valid job's row is (planning errors name it like load errors do)."""
        self._materialised()
        return self._wheres.get(job_id)

    @property
    def jobs(self) -> list[Job]:
        return [e for e in self.entries if isinstance(e, Job)]

    @property
    def errors(self) -> list[RowError]:
        return [e for e in self.entries if isinstance(e, RowError)]

    @property
    def name(self) -> str:
        return self.path.stem if self.path else "adhoc"


# ---- reading ----------------------------------------------------------------------------------------

def load_catalog(path: str | Path) -> Catalog:
    """A file catalog: the whole file checked and its rows counted now, the rows validated when streamed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CatalogError(f"{path}: no such catalog file")
    suffix = path.suffix.lower()
    defaults: dict[str, Any] = {}
    if suffix in (".yaml", ".yml"):
        if path.stat().st_size > MAX_YAML_BYTES:
            raise CatalogError(f"{path}: {path.stat().st_size / 1e6:.0f} MB, more than the {MAX_YAML_BYTES >> 20} "
                               "MiB a YAML catalog may have (split it, or use CSV/Parquet)")
        try:
            count, defaults = scan_yaml(path)
        except YamlCatalogError as exc:
            raise CatalogError(str(exc)) from None
        rows: Rows = partial(yaml_rows, path)
    elif suffix == ".csv":
        count, rows = sum(1 for _ in _csv_rows(path, cells=False)), partial(_csv_rows, path)
    elif suffix in (".parquet", ".pq"):
        count, rows = _parquet_count(path), partial(_parquet_rows, path)
    else:
        raise CatalogError(f"{path}: unknown catalog format {suffix!r} (use .yaml, .csv or .parquet)")
    return Catalog(path, rows=rows, base=path.parent, defaults=defaults, count=count)


def build_catalog(rows: list[tuple[str, dict[str, Any]]], *, base: Path, defaults: Mapping[str, Any] | None = None,
                  source: Path | None = None) -> Catalog:
    """Validate ``(where, row)`` pairs into an in-memory catalog; paths relative to ``base``."""
    check = _Checker(base, defaults or {})
    entries = [check.entry(i, where, row) for i, (where, row) in enumerate(rows)]
    wheres = {e.id: where for (where, _), e in zip(rows, entries, strict=True) if isinstance(e, Job)}
    return Catalog(source, entries, wheres, base=base, defaults=defaults)


class _Checker:
    """Validates rows one at a time. For the duplicate-id rule it keeps, per casefolded id, the first row's line
    (a number, when its "where" is the file's name and "line N" like the first row's; else the whole text)
    and, in ``cased``, its id where that differs from the casefolded one."""

    def __init__(self, base: Path, defaults: Mapping[str, Any]) -> None:
        self.base, self.defaults = base, dict(defaults)
        self.seen: dict[str, int | str] = {}
        self.cased: dict[str, str] = {}
        self.head: str | None = None  # "catalogs/x.yaml line": what every row of a file shares

    def entry(self, i: int, where: str, row: dict[str, Any]) -> Job | RowError:
        job_id = str(row.get("id") or f"row-{i + 1}")
        if "__bad__" in row:
            return RowError(job_id, where, "(row)", str(row["__bad__"]))
        merged = _merge(self.defaults, row)
        for name in PATH_FIELDS:
            if merged.get(name) not in (None, ""):
                merged[name] = (self.base / str(merged[name])).resolve() \
                    if not Path(str(merged[name])).is_absolute() else Path(str(merged[name]))
        folded = job_id.casefold()
        first = self.seen.get(folded)
        if first is not None:
            owner = self.cased.get(folded, folded)
            same = "" if owner == job_id else f" as {owner!r} apart from case (one output folder on macOS)"
            there = _where_short(f"{self.head} {first}" if isinstance(first, int) else first, where)
            return RowError(job_id, where, "id",
                            f"duplicate job id {job_id!r}: {there} has it already{same}; only that row runs")
        head, _, tail = where.rpartition(" ")
        self.head = head if self.head is None else self.head
        plain = tail.isascii() and tail.isdigit() and not tail.startswith("0")  # the number prints back as is
        self.seen[folded] = int(tail) if head == self.head and plain else where
        if job_id != folded:
            self.cased[folded] = job_id
        try:
            return Job.model_validate(merged)
        except ValidationError as exc:
            err = exc.errors()[0]
            msg = err["msg"].removeprefix("Value error, ")
            field = ".".join(str(p) for p in err["loc"])
            if not field:  # a cross-field check: its message starts with the field's name
                name, sep, rest = msg.partition(": ")
                field, msg = (name, rest) if sep and name in (*PATH_FIELDS, "id") else ("(row)", msg)
            return RowError(job_id, where, field, msg)


def _where_short(first: str, here: str) -> str:
    """``first`` without the file name ``here`` shares with it ("line 3" rather than the whole path again)."""
    head, sep, tail = first.rpartition(" line ") if " line " in first else first.rpartition(" row ")
    if sep and here.startswith(head + sep):
        return f"{sep.strip()} {tail}"
    return first


def _merge(base: dict[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in row.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _table_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Flat columns -> a job mapping: ``stage.param`` and ``backend.stage`` columns nest; blanks drop."""
    row: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None or (isinstance(value, str) and value.strip() == ""):
            continue
        if isinstance(value, float) and value != value:  # NaN from Parquet/pandas
            continue
        key = str(key).strip()
        if key in ("params", "backends") and isinstance(value, str):
            try:
                row[key] = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                row[key] = value  # pydantic reports the field
        elif key.startswith(("backend.", "backends.")):
            row.setdefault("backends", {})[key.split(".", 1)[1]] = value
        elif "." in key:
            stage, param = key.split(".", 1)
            row.setdefault("params", {}).setdefault(stage, {})[param] = _scalar(value)
        else:
            row[key] = value if key not in ("seed",) else _scalar(value)
    return row


def _scalar(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return safe_yaml(value, "cell")[0]  # a cell is YAML too: the same limits (an alias bomb stays a string)
    except UnsafeYaml:
        return value


def _csv_rows(path: Path, cells: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows as they are read (``cells=False``: raw, for load to count them and check the whole file)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        try:
            if not reader.fieldnames or "id" not in reader.fieldnames:
                raise CatalogError(f"{path}: a CSV catalog needs a header row with at least 'id' and 'source'")
            for raw in reader:
                if None in raw:  # more cells than header columns: DictReader files them under None
                    raw = {**raw, "(extra cells)": raw.pop(None)}
                yield f"{path} line {reader.line_num}", _table_row(raw) if cells else raw
        except UnicodeDecodeError as exc:
            raise CatalogError(f"{path}: not UTF-8 text (byte {exc.start}): is this a catalog?") from None
        except csv.Error as exc:  # a NUL byte, a cell over csv's field size limit
            raise CatalogError(f"{path} line {reader.line_num}: unreadable CSV ({exc})") from None


def _parquet_count(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            return pf.metadata.num_rows
    except Exception as exc:
        raise CatalogError(f"{path}: unreadable Parquet file ({exc})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    i = 0
    try:
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=1024):  # one batch of rows in memory at a time
                for raw in batch.to_pylist():
                    i += 1
                    yield f"{path} row {i}", _table_row(raw)
    except Exception as exc:
        raise CatalogError(f"{path} row {i + 1}: unreadable Parquet file ({exc})") from None


def single_job(source: str | Path, *, prompt: str, job_id: str | None = None, base: Path | None = None,
               **fields: Any) -> Catalog:
    """A one-job catalog for ``v2v edit`` (paths relative to the working directory)."""
    src = Path(source)
    # A frame folder is often called "frames": name the job after the clip's folder then.
    name = src.resolve().parent.name if src.name.lower() in ("frames", "images", "jpegimages", "rgb") else src.stem
    row = {"id": job_id or re.sub(r"[^A-Za-z0-9._-]+", "-", name or "video").strip("-.") or "video",
           "source": str(source), "prompt": prompt,
           **{k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items() if v not in (None, {}, "")}}
    return build_catalog([("command line", row)], base=base or Path.cwd())
