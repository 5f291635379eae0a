"""A queue of waiting requests that keeps, beside them, the numbers the policies rank them by.

Ranking thousands of waiting requests is cheap over arrays; reading each request's numbers out
of Python objects, every step, is not (it was most of a decision at 4096 requests). A waiting
request's numbers do not change while it waits, so RequestQueue reads them once, when the
request joins, into columns kept in queue order. The policies rank a RequestQueue (or a
`snapshot` of one) from these columns, and any other sequence of requests from columns they
gather then (`columns_of`); both decide the same, which the tests check.

Requests in a queue are told apart by identity. A caller must not change a queued request's
numbers; the engine's waiting prompts and ready sequences, and a decode worker's offers, hold
still while they wait.
"""

from __future__ import annotations

import itertools
from functools import cached_property

try:
    import numpy as np
except ImportError:  # without numpy the policies keep to their plain-Python paths
    np = None

# The columns, in the order of the rows of RequestQueue's float and int tables.
FLOAT_FIELDS = ("arrival", "first_token", "ttft_s", "tpot_s")
INT_FIELDS = ("produced", "max_tokens", "hint", "num_tokens", "prompt", "uncomputed", "class_code")
IDENTITY = len(INT_FIELDS)  # the int table's last row: each request's id(), to find it by


def _floats(r) -> tuple[float, float, float, float]:
    slo = r.slo
    return r.arrival_time, r.first_token_time, slo.ttft_s, slo.tpot_s


def _ints(r, class_code: int) -> tuple[int, int, int, int, int, int, int, int]:
    hint = r.slo.output_len_hint
    return (r.num_output_tokens, r.max_tokens, -1 if hint is None else hint, r.num_tokens, r.num_prompt_tokens,
            r.num_uncomputed_tokens, class_code, id(r))


class Columns:
    """Per request, in order: `arrival`, `first_token`, `ttft_s`, `tpot_s` (float64);
    `produced` (output tokens), `max_tokens`, `hint` (the output length hint, -1 for none),
    `num_tokens`, `prompt` (prompt tokens), `uncomputed` (prompt tokens still to prefill) and
    `class_code` (int64), where request class `class_names[code]` has that code."""

    def __init__(self, floats, ints, class_names: list):
        for name, column in zip(FLOAT_FIELDS, floats):
            setattr(self, name, column)
        for name, column in zip(INT_FIELDS, ints):
            setattr(self, name, column)
        self.class_names = class_names


class GatheredColumns:
    """The columns of a plain sequence of requests, each read from them when first asked for."""

    def __init__(self, requests):
        self.requests = requests

    @cached_property
    def arrival(self):
        return np.array([r.arrival_time for r in self.requests], dtype=np.float64)

    @cached_property
    def first_token(self):
        return np.array([r.first_token_time for r in self.requests], dtype=np.float64)

    @cached_property
    def ttft_s(self):
        return np.array([r.slo.ttft_s for r in self.requests], dtype=np.float64)

    @cached_property
    def tpot_s(self):
        return np.array([r.slo.tpot_s for r in self.requests], dtype=np.float64)

    @cached_property
    def produced(self):
        return np.array([r.num_output_tokens for r in self.requests], dtype=np.int64)

    @cached_property
    def max_tokens(self):
        return np.array([r.max_tokens for r in self.requests], dtype=np.int64)

    @cached_property
    def hint(self):
        hints = [r.slo.output_len_hint for r in self.requests]
        return np.array([-1 if h is None else h for h in hints], dtype=np.int64)

    @cached_property
    def num_tokens(self):
        return np.array([r.num_tokens for r in self.requests], dtype=np.int64)

    @cached_property
    def prompt(self):
        return np.array([r.num_prompt_tokens for r in self.requests], dtype=np.int64)

    @cached_property
    def uncomputed(self):
        return np.array([r.num_uncomputed_tokens for r in self.requests], dtype=np.int64)

    @cached_property
    def _classes(self):
        codes: dict = {}
        column = np.array([codes.setdefault(r.slo.request_class, len(codes)) for r in self.requests], dtype=np.int64)
        return column, list(codes)

    @property
    def class_code(self):
        return self._classes[0]

    @property
    def class_names(self):
        return self._classes[1]


def columns_of(requests):
    """The columns of `requests`: those a RequestQueue (or its snapshot) keeps, else gathered."""
    kept = getattr(requests, "columns", None)
    return kept if kept is not None else GatheredColumns(requests)


class RequestQueue:
    """An ordered queue of requests (a list's reading, appending, inserting and removing) whose
    numbers are kept as columns: see the module's docstring."""

    def __init__(self, requests=()):
        self._items: list = []
        self._class_codes: dict = {}
        self._class_names: list = []
        if np is not None:
            self._floats = np.empty((len(FLOAT_FIELDS), 64), dtype=np.float64)
            self._ints = np.empty((len(INT_FIELDS) + 1, 64), dtype=np.int64)
        for r in requests:
            self.append(r)

    # ---- reading, as a list ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self):
        return iter(self._items)

    def __getitem__(self, index):
        return self._items[index]

    def __contains__(self, r) -> bool:
        return r in self._items

    def __repr__(self) -> str:
        return f"RequestQueue({self._items!r})"

    # ---- changing ---------------------------------------------------------------------------------

    def append(self, r) -> None:
        self.insert(len(self._items), r)

    def insert(self, index: int, r) -> None:
        n = len(self._items)
        index = max(0, min(n, index if index >= 0 else n + index))
        if np is not None:
            code = self._class_code(r.slo.request_class)  # before the shift: it may renumber the rows
            if n == self._floats.shape[1]:
                self._floats = np.concatenate([self._floats, np.empty_like(self._floats)], axis=1)
                self._ints = np.concatenate([self._ints, np.empty_like(self._ints)], axis=1)
            if index < n:
                self._floats[:, index + 1 : n + 1] = self._floats[:, index:n]
                self._ints[:, index + 1 : n + 1] = self._ints[:, index:n]
            self._floats[:, index] = _floats(r)
            self._ints[:, index] = _ints(r, code)
        self._items.insert(index, r)

    def remove(self, r) -> None:
        """Removes r (ValueError if it is not queued)."""
        self.remove_all([r])

    def remove_all(self, requests) -> None:
        """Removes every one of `requests` in one pass over the columns (ValueError, and nothing
        removed, if one is not queued)."""
        n = len(self._items)
        positions = self._positions(requests)
        if len(positions) != len(requests):
            raise ValueError("RequestQueue.remove_all: a request to remove is not queued (or is named twice)")
        for i in reversed(positions):
            del self._items[i]
        if np is not None and positions:
            keep = np.ones(n, dtype=bool)
            keep[positions] = False
            kept = np.flatnonzero(keep)
            self._floats[:, : kept.size] = self._floats.take(kept, axis=1)
            self._ints[:, : kept.size] = self._ints.take(kept, axis=1)

    def _positions(self, requests) -> list[int]:
        """Where the queued ones of `requests` stand, in queue order."""
        if np is None:
            chosen = set(map(id, requests))
            return [i for i, r in enumerate(self._items) if id(r) in chosen]
        # By identity, in the queue's own column of ids rather than by a search in Python.
        wanted = np.fromiter(map(id, requests), dtype=np.int64, count=len(requests))
        return np.flatnonzero(np.isin(self._ints[IDENTITY, : len(self._items)], wanted)).tolist()

    def _class_code(self, name) -> int:
        code = self._class_codes.get(name)
        if code is None:
            if len(self._class_names) > 2 * len(self._items) + 64:
                self._renumber_classes()  # clients name classes: keep only the names still queued
            code = self._class_codes[name] = len(self._class_names)
            self._class_names.append(name)
        return code

    def _renumber_classes(self) -> None:
        self._class_codes, self._class_names = {}, []
        codes = self._ints[INT_FIELDS.index("class_code")]
        for i, r in enumerate(self._items):
            codes[i] = self._class_codes.setdefault(r.slo.request_class, len(self._class_codes))
        self._class_names = list(self._class_codes)

    # ---- for the policies -------------------------------------------------------------------------

    @property
    def columns(self) -> Columns | None:
        """The queued requests' numbers, in queue order (views, valid until the queue changes);
        None without numpy."""
        if np is None:
            return None
        n = len(self._items)
        return Columns(self._floats[:, :n], self._ints[:IDENTITY, :n], self._class_names)

    def snapshot(self, front=(), skip=()) -> QueueSnapshot:
        """The requests `front` (read when a policy asks for their columns: they may be changing,
        as prompts part-way through are) then the queued ones but `skip`, as one list that a
        policy ranks by columns. Its columns must be read before the queue changes."""
        front = list(front)
        if not skip:
            return QueueSnapshot(front + self._items, lambda: self._columns_after(front, None))
        if np is None:
            skipped = set(map(id, skip))
            return QueueSnapshot(front + [r for r in self._items if id(r) not in skipped], lambda: None)
        keep = np.ones(len(self._items), dtype=bool)
        keep[self._positions(skip)] = False
        return QueueSnapshot(front + list(itertools.compress(self._items, keep.tolist())),
                             lambda: self._columns_after(front, keep))

    def _columns_after(self, front: list, keep) -> Columns | None:
        """The columns of `front`, then of the queued requests where `keep` (a mask; all for None)."""
        queued = self.columns
        if queued is None or (not front and keep is None):
            return queued
        ahead = GatheredColumns(front)
        codes = dict(self._class_codes)  # the front's classes take codes after the queue's own
        ahead_codes = np.array([codes.setdefault(c, len(codes)) for c in ahead.class_names], dtype=np.int64)
        parts = []
        for name in FLOAT_FIELDS + INT_FIELDS:
            column = getattr(queued, name) if keep is None else getattr(queued, name)[keep]
            if front:
                head = ahead_codes[ahead.class_code] if name == "class_code" else getattr(ahead, name)
                column = np.concatenate([head, column])
            parts.append(column)
        return Columns(parts[: len(FLOAT_FIELDS)], parts[len(FLOAT_FIELDS) :], list(codes))


class QueueSnapshot(list):
    """A list of requests made for one decision, whose columns are made when first read."""

    def __init__(self, requests, make_columns):
        super().__init__(requests)
        self._make_columns = make_columns

    @cached_property
    def columns(self) -> Columns | None:
        return self._make_columns()
