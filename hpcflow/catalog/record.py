"""Dataset records: what the catalog knows about one stored (part of a) dataset.

A record is an immutable value.  It travels over the wire as a plain dict
(msgpack-safe), and :meth:`DatasetRecord.from_wire` validates everything a
peer sends, so garbage from the network never becomes a record.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from ..errors import InvalidData, InvalidName, ProtocolError

#: Dataset names: a letter, digit or underscore first, then a small safe set.
#: No path separators, no "..", no control characters, no whitespace.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+=\-]{0,127}")
MAX_NDIM = 32
#: Parts of one dataset (and so the largest part index + 1).  Every structure built from a
#: peer's claim about parts (the missing list of a location, say) is bounded by this.
MAX_PARTS = 100_000
#: The largest dataset part a node accepts (1 PiB): beyond it sizes overflow int64 maths.
MAX_NBYTES = 1 << 50
_NUMERIC_KINDS = "biufc"


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid dataset name, else raise :class:`InvalidName`."""
    if not isinstance(name, str):
        raise InvalidName(f"dataset name must be a string, got {type(name).__name__}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise InvalidName(
            f"invalid dataset name {shown!r}: use 1-128 characters from A-Z a-z 0-9 _ . : + = -, "
            "starting with a letter, digit or underscore, and no '..'"
        )
    return name


def validate_flag(value: object, what: str) -> bool:
    """A yes/no option must be a bool: ``overwrite="no"`` is truthy, so a string or a
    number would silently mean yes."""
    if not isinstance(value, bool | np.bool_):
        raise InvalidData(f"{what} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def validate_part(part: object) -> int | None:
    """Parts are non-negative ints; ``None`` means an unpartitioned dataset."""
    if part is None:
        return None
    if isinstance(part, bool) or not isinstance(part, int | np.integer) or int(part) < 0:
        raise InvalidData(f"part must be a non-negative integer or None, got {part!r}")
    if int(part) >= MAX_PARTS:
        raise InvalidData(f"part index {part} is too large (at most {MAX_PARTS - 1})")
    return int(part)


def validate_nparts(nparts: object, part: int | None) -> int | None:
    """``nparts`` is optional; when given it is 1..MAX_PARTS and ``part`` lies below it."""
    if nparts is None:
        return None
    if isinstance(nparts, bool) or not isinstance(nparts, int | np.integer):
        raise InvalidData(f"nparts must be a positive integer or None, got {nparts!r}")
    n = int(nparts)
    if not 1 <= n <= MAX_PARTS:
        raise InvalidData(f"nparts must be between 1 and {MAX_PARTS}, got {n}")
    if part is None or not 0 <= part < n:
        raise InvalidData(f"part {part} is outside nparts={n}")
    return n


def validate_dtype(dtype: object) -> np.dtype[Any]:
    """Only plain numeric dtypes are stored (no objects, strings or records)."""
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise InvalidData(f"not a numpy dtype: {dtype!r}") from exc
    if dt.kind not in _NUMERIC_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise InvalidData(f"dtype {dt} is not supported: only bool, integer, float and complex")
    return dt


def validate_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
        raise InvalidData(f"shape must be a list of at most {MAX_NDIM} ints, got {shape!r}")
    out = []
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or int(n) < 0:
            raise InvalidData(f"shape entries must be non-negative ints, got {shape!r}")
        out.append(int(n))
    return tuple(out)


def layout_nbytes(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """Bytes of an array of ``shape`` and ``dtype``, refusing sizes no node could hold
    (exact integer maths: numpy's int64 product silently wraps for huge shapes)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_NBYTES:
        raise InvalidData(f"shape {list(shape)} of {dtype} is {nbytes} bytes: more than the "
                          f"{MAX_NBYTES >> 50} PiB a dataset part may have")
    return nbytes


def key_of(name: str, part: int | None) -> str:
    """The catalog key of a dataset part; '@' cannot occur in names."""
    return name if part is None else f"{name}@{part}"


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset (or one row-part of a partitioned dataset) held by one node."""

    name: str
    part: int | None
    owner: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    checksum: str
    chunk_bytes: int
    version: int = 1
    nparts: int | None = None
    created: float = 0.0
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return key_of(self.name, self.part)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def with_owner(self, owner: str) -> DatasetRecord:
        return replace(self, owner=owner)

    def to_wire(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies the lineage and cost a millisecond per
        # small workflow step.
        return {"name": self.name, "part": self.part, "owner": self.owner,
                "shape": list(self.shape), "dtype": self.dtype, "nbytes": self.nbytes,
                "checksum": self.checksum, "chunk_bytes": self.chunk_bytes,
                "version": self.version, "nparts": self.nparts, "created": self.created,
                "lineage": dict(self.lineage)}

    @classmethod
    def from_wire(cls, d: object) -> DatasetRecord:
        """Validate a record dict from a peer; raise :class:`ProtocolError` if malformed."""
        if not isinstance(d, dict):
            raise ProtocolError(f"record must be a map, got {type(d).__name__}")
        try:
            lineage = d.get("lineage") or {}
            if not isinstance(lineage, dict):
                raise InvalidData("lineage must be a map")
            part = validate_part(d.get("part"))
            rec = cls(
                name=validate_name(d["name"]),
                part=part,
                owner=_str(d["owner"], "owner"),
                shape=validate_shape(d["shape"]),
                dtype=validate_dtype(d["dtype"]).str,
                nbytes=_nonneg(d["nbytes"], "nbytes"),
                checksum=_str(d["checksum"], "checksum"),
                chunk_bytes=_nonneg(d["chunk_bytes"], "chunk_bytes"),
                version=_nonneg(d.get("version", 1), "version"),
                nparts=validate_nparts(d.get("nparts"), part),
                created=float(d.get("created", 0.0)),
                lineage=lineage,
            )
            expected = layout_nbytes(rec.shape, np.dtype(rec.dtype))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed dataset record: {exc}") from exc
        if expected != rec.nbytes:
            raise ProtocolError(f"record {rec.key}: nbytes {rec.nbytes} != shape*itemsize")
        return rec


def _str(v: object, what: str) -> str:
    if not isinstance(v, str) or not v or len(v) > 256:
        raise ProtocolError(f"{what} must be a non-empty string")
    return v


def _nonneg(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ProtocolError(f"{what} must be a non-negative int, got {v!r}")
    return v


_K = TypeVar("_K")
_V = TypeVar("_V")


class _Guarded(dict[_K, _V]):
    """A dict that changes only by ``[key] = value``, ``del [key]`` and ``pop`` (through
    ``del``): the other mutators are refused, so a subclass that keeps indexes in
    ``__setitem__`` and ``__delitem__`` cannot let them go stale."""

    def pop(self, key: _K, *default: Any) -> Any:
        if key in self:
            value = dict.__getitem__(self, key)
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} changes only by [key] = value, del and pop")

    update = setdefault = popitem = clear = __ior__ = _refuse  # type: ignore[assignment]


class RecordTable(_Guarded[str, DatasetRecord]):
    """Records by key, also indexed by dataset name and by the dataset a slice is of.

    A flow's intermediates stay catalogued until it closes: with thousands of
    them, finding one dataset's parts by scanning every record cost a visible
    share of each small op.  Only ``[key] = rec``, ``del [key]`` and ``pop`` change
    a table (other dict mutators are refused, so the indexes cannot go stale).
    """

    def __init__(self, records: Iterable[DatasetRecord] = ()) -> None:
        super().__init__()
        self._by_name: dict[str, dict[str, DatasetRecord]] = {}
        self._slices: dict[str, dict[str, DatasetRecord]] = {}
        #: The :class:`RecordTables` this table is in, and under which origin.
        self.owner: tuple[RecordTables, str] | None = None
        for rec in records:
            self[rec.key] = rec

    def __setitem__(self, key: str, rec: DatasetRecord) -> None:
        if key in self:
            self._unindex(key, dict.__getitem__(self, key))
        super().__setitem__(key, rec)
        for index, by in ((self._by_name, rec.name), (self._slices, rec.lineage.get("slice_of"))):
            if isinstance(by, str):
                if by not in index and self.owner is not None:
                    self.owner[0].enlist(index is self._slices, by, self.owner[1])
                index.setdefault(by, {})[key] = rec

    def __delitem__(self, key: str) -> None:
        self._unindex(key, dict.__getitem__(self, key))
        super().__delitem__(key)

    def _unindex(self, key: str, rec: DatasetRecord) -> None:
        for index, by in ((self._by_name, rec.name), (self._slices, rec.lineage.get("slice_of"))):
            if isinstance(by, str) and by in index:
                index[by].pop(key, None)
                if not index[by]:
                    del index[by]
                    if self.owner is not None:
                        self.owner[0].unlist(index is self._slices, by, self.owner[1])

    def named(self, name: str) -> list[DatasetRecord]:
        """The records (parts) of dataset ``name``."""
        return list(self._by_name.get(name, {}).values())

    def slices_of(self, name: str) -> list[DatasetRecord]:
        """The slices (``NAME:rowsLO-HI``) held of dataset ``name``."""
        return list(self._slices.get(name, {}).values())



class RecordTables(_Guarded[str, RecordTable]):
    """Record tables by origin, with an index across them: the origins holding a record
    of each name, and a slice of each name.  Finding one name's records then costs the
    number of its holders, not of the origins (at 256 members every ``wait`` and
    ``locate`` scanned 256 tables, several times per update).  Only ``[origin] =
    table``, ``del [origin]`` and ``pop`` change it; a table belongs to one at a time."""

    def __init__(self) -> None:
        super().__init__()
        self._holding: defaultdict[str, dict[str, None]] = defaultdict(dict)
        self._slicing: defaultdict[str, dict[str, None]] = defaultdict(dict)

    def enlist(self, slices: bool, name: str, origin: str) -> None:
        """``origin``'s table now holds (a slice of) ``name``."""
        (self._slicing if slices else self._holding)[name][origin] = None

    def unlist(self, slices: bool, name: str, origin: str) -> None:
        """``origin``'s table no longer holds (a slice of) ``name``."""
        index = self._slicing if slices else self._holding
        origins = index.get(name)
        if origins is not None:
            origins.pop(origin, None)
            if not origins:
                del index[name]

    def __setitem__(self, origin: str, table: RecordTable) -> None:
        if table.owner is not None:
            raise ValueError("a record table belongs to one RecordTables at a time")
        if origin in self:
            self._detach(origin)
        super().__setitem__(origin, table)
        table.owner = (self, origin)
        self._list(origin, table, self.enlist)

    def __delitem__(self, origin: str) -> None:
        self._detach(origin)
        super().__delitem__(origin)

    def _detach(self, origin: str) -> None:
        table = dict.__getitem__(self, origin)
        self._list(origin, table, self.unlist)
        table.owner = None

    @staticmethod
    def _list(origin: str, table: RecordTable,
              how: Callable[[bool, str, str], None]) -> None:
        for slices, index in ((False, table._by_name), (True, table._slices)):
            for name in index:
                how(slices, name, origin)

    def holding(self, name: str) -> list[str]:
        """The origins with a record of ``name``."""
        origins = self._holding.get(name)
        return list(origins) if origins else []

    def slicing(self, name: str) -> list[str]:
        """The origins with a slice of ``name``."""
        origins = self._slicing.get(name)
        return list(origins) if origins else []

