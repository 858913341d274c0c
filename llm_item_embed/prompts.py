"""Item prompts: an instruction followed by ``<name> is <value>`` atoms, with random attribute drop.

>>> t = PromptTemplate("This beauty product has the following attributes:", {"title": "name", "price": "price"})
>>> t.render({"title": "Red lipstick", "price": 9.99})
'This beauty product has the following attributes: name is Red lipstick; price is 9.99.'
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["PromptTemplate", "format_value"]


def _is_missing_scalar(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, (np.floating,)) and np.isnan(value):
        return True
    try:  # pandas NA / NaT and friends
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return True
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    return False


def _format_number(value: Any) -> str | None:
    if isinstance(value, (bool, np.bool_)):
        return "true" if bool(value) else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    f = float(value)
    if math.isnan(f) or math.isinf(f):
        return None
    if f.is_integer() and abs(f) < 1e15:
        return str(int(f))
    if isinstance(value, np.floating) and np.dtype(type(value)).itemsize < 8:
        return np.format_float_positional(value, trim="-")  # shortest text for float32/float16
    text = repr(f)  # shortest round-trip text: 9.99 -> "9.99"
    return text if len(text) <= 12 else f"{f:.10g}"  # 0.1 + 0.2 -> "0.3"


def format_value(value: Any, list_separator: str = ", ") -> str | None:
    """Turn one attribute value into text, or ``None`` when it is missing.

    Missing: ``None``, NaN, ``pd.NA``, empty or whitespace-only strings, and lists whose elements are
    all missing. Lists, tuples, sets and arrays are joined with ``list_separator``; integral floats
    lose their ``.0``; other objects go through ``str``.
    """
    if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else list(value)
        parts = [format_value(v, list_separator) for v in items]
        parts = [p for p in parts if p is not None]
        return list_separator.join(parts) if parts else None
    if _is_missing_scalar(value):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        text = " ".join(value.split())
        return text or None
    if isinstance(value, (numbers.Number, np.number, np.bool_)) and not isinstance(value, complex):
        return _format_number(value)
    text = " ".join(str(value).split())
    return text or None


@dataclass
class PromptTemplate:
    """Instruction + ``<name> is <value>`` atoms joined by ``separator`` and closed by ``end``.

    Args:
        instruction: text put before the atoms (may be empty).
        fields: ``{column: attribute name}`` in prompt order; ``None`` uses every non-id column of the
            table, named after the column (resolved by :meth:`resolve`).
        separator: text between atoms.
        end: text after the last atom.
    """

    instruction: str = "This item has the following attributes:"
    fields: dict[str, str] | None = None
    separator: str = "; "
    end: str = "."
    list_separator: str = ", "
    _columns: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ columns
    def columns(self, row_or_columns: Mapping | Iterable[str] | None = None, id_column: str | None = None) -> list[tuple[str, str]]:
        """``[(column, attribute name)]`` used for a row (``fields=None``: all its non-id keys)."""
        if self.fields is not None:
            return list(self.fields.items())
        if self._columns is not None:
            return [(c, c) for c in self._columns]
        if row_or_columns is None:
            raise ValueError("PromptTemplate(fields=None) needs a table: call validate(df) or pass fields")
        keys = row_or_columns.keys() if isinstance(row_or_columns, Mapping) else row_or_columns
        return [(str(c), str(c)) for c in keys if c != id_column]

    def resolve(self, columns: Sequence[str], id_column: str) -> "PromptTemplate":
        """Fix the field list from a table's columns when ``fields is None`` (in place); returns self."""
        if self.fields is None:
            self._columns = [str(c) for c in columns if c != id_column]
        return self

    # ------------------------------------------------------------------ render
    def atoms(self, row: Mapping, id_column: str | None = None) -> list[str]:
        """The ``"<name> is <value>"`` atoms of one row, missing values omitted."""
        out = []
        for column, name in self.columns(row, id_column):
            value = format_value(row.get(column) if hasattr(row, "get") else row[column], self.list_separator)
            if value is not None:
                out.append(f"{name} is {value}")
        return out

    def join(self, atoms: Sequence[str]) -> str:
        """Assemble the prompt text from already formatted atoms."""
        body = self.separator.join(atoms) + self.end
        return f"{self.instruction} {body}" if self.instruction else body

    def render(self, row: Mapping, drop_prob: float = 0.0, rng: np.random.Generator | None = None,
               id_column: str | None = None) -> str:
        """Render one row; each atom is dropped with probability ``drop_prob``, but at least one is kept."""
        return self.join(self.drop(self.atoms(row, id_column), drop_prob, rng))

    @staticmethod
    def drop(atoms: Sequence[str], drop_prob: float, rng: np.random.Generator | None = None) -> list[str]:
        """Drop each atom independently with ``drop_prob``; if all would go, keep one at random."""
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        atoms = list(atoms)
        if drop_prob == 0.0 or not atoms:
            return atoms
        rng = rng if rng is not None else np.random.default_rng()
        keep = rng.random(len(atoms)) >= drop_prob
        if not keep.any():
            keep[rng.integers(len(atoms))] = True
        return [a for a, k in zip(atoms, keep) if k]

    def render_views(self, rows: Sequence[Mapping], n_views: int = 2, drop_prob: float = 0.2,
                     rng: np.random.Generator | None = None, id_column: str | None = None) -> list[list[str]]:
        """``n_views`` independently dropped renderings of every row: a list of ``n_views`` lists."""
        rng = rng if rng is not None else np.random.default_rng()
        atoms = [self.atoms(r, id_column) for r in rows]
        return [[self.join(self.drop(a, drop_prob, rng)) for a in atoms] for _ in range(n_views)]

    # ------------------------------------------------------------------ checks
    def validate(self, df: Any, id_column: str = "item_id") -> None:
        """Check a table before any model work; raises ``ValueError``/``KeyError`` naming the culprit.

        Also fixes the field list when ``fields is None``.
        """
        columns = [str(c) for c in getattr(df, "columns", [])]
        if id_column not in columns:
            raise KeyError(f"id column {id_column!r} is not in the table; columns are {columns}")
        if len(df) == 0:
            raise ValueError("the item table is empty (0 rows)")
        ids = df[id_column].astype(str)
        dup = ids[ids.duplicated(keep=False)]
        if len(dup):
            examples = sorted(set(dup.tolist()))[:5]
            raise ValueError(f"{dup.nunique()} item id(s) appear more than once in column {id_column!r}, e.g. {examples}")
        if self.fields is not None:
            missing = [c for c in self.fields if c not in columns]
            if missing:
                raise KeyError(f"template field(s) {missing} are not columns of the table; columns are {columns}")
        else:
            self.resolve(columns, id_column)
            if not self._columns:
                raise ValueError(f"the table has no attribute column besides the id column {id_column!r}")
        used = [c for c, _ in self.columns()]
        for start in range(0, len(df), 8192):  # in chunks: bounded memory on large catalogues
            part = df.iloc[start:start + 8192]
            for item_id, row in zip(ids.iloc[start:start + 8192].tolist(), part[used].to_dict("records")):
                if not self.atoms(row):
                    raise ValueError(f"item {item_id!r} has no non-empty attribute among {used}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """JSON-safe description (the resolved field list when ``fields`` was ``None``)."""
        fields = self.fields
        if fields is None and self._columns is not None:
            fields = {c: c for c in self._columns}
        # fields as [column, name] pairs: JSON writers may sort object keys, and order matters here
        return {"instruction": self.instruction,
                "fields": [[c, n] for c, n in fields.items()] if fields is not None else None,
                "separator": self.separator, "end": self.end, "list_separator": self.list_separator}

    @classmethod
    def from_dict(cls, d: Mapping) -> "PromptTemplate":
        """Inverse of :meth:`to_dict` (``fields`` may be ``[[column, name], ...]`` or a mapping)."""
        known = {"instruction", "fields", "separator", "end", "list_separator"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PromptTemplate keys {sorted(unknown)}")
        d = dict(d)
        fields = d.get("fields")
        if fields is not None and not isinstance(fields, Mapping):
            d["fields"] = {str(c): str(n) for c, n in fields}
        return cls(**d)
