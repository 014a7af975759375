"""A list of many small dicts sent between replicas as columns: what a snapshot's model call carries.

A fleet snapshot's call to a detector holds a thousand items, each a dict with a few small numpy arrays
(the entity's last rows, its statistics), and the answer holds as many (scores, top metrics). Ray
serialises every small array as an object of its own, which cost about 30% of the ingress's CPU and
of the detector replica's in a 10,000-entity snapshot (py-spy, 2026-12-03). `pack` stacks each field
that is an array of one shape and dtype in every dict that has it into one array, so a call carries a
few big buffers; `unpack` gives back the same dicts, whose arrays are views of those buffers. Anything
else (strings, numbers, nested dicts, arrays of differing shapes) travels as a list. One level of
nesting (an answer's `arrays`) and tuples of arrays (an item's statistics) are packed the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PACK_FROM = 16  # items from which a call is sent packed: below it, stacking costs more than it saves
_PACKED = "raywatch.packed"


def is_packed(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get(_PACKED) is True


def pack(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`items` as columns: per field, (indices of the items that have it, their values stacked or listed)."""
    columns: dict[str, tuple[list[int], list[Any]]] = {}
    for i, item in enumerate(items):
        for key, value in item.items():
            column = columns.setdefault(key, ([], []))
            column[0].append(i)
            column[1].append(value)
    out: dict[str, Any] = {_PACKED: True, "n": len(items), "columns": {}, "nested": {}, "tuples": {}}
    for key, (idx, values) in columns.items():
        if all(isinstance(v, dict) for v in values):  # an answer's `arrays`, a model reference
            out["nested"][key] = (idx, pack(values))
        elif all(isinstance(v, tuple) for v in values) and len({len(v) for v in values}) == 1:
            out["tuples"][key] = (idx, [_stacked([v[j] for v in values]) for j in range(len(values[0]))])
        else:
            out["columns"][key] = (idx, _stacked(values))
    return out


def unpack(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The dicts `pack` was given, in order (arrays as views of the stacked ones)."""
    items: list[dict[str, Any]] = [{} for _ in range(payload["n"])]
    for key, (idx, values) in payload["columns"].items():
        for i, value in zip(idx, values):
            items[i][key] = value
    for key, (idx, inner) in payload["nested"].items():
        for i, value in zip(idx, unpack(inner)):
            items[i][key] = value
    for key, (idx, parts) in payload["tuples"].items():
        for i, value in zip(idx, zip(*parts)):
            items[i][key] = value
    return items


def _stacked(values: list[Any]) -> Any:
    """One array when every value is an array of one shape and dtype (indexing it gives each back as a
    view), else the list."""
    first = values[0]
    if not isinstance(first, np.ndarray) or first.dtype == object:
        return values
    shape, dtype = first.shape, first.dtype
    if all(isinstance(v, np.ndarray) and v.shape == shape and v.dtype == dtype for v in values):
        return np.stack(values)
    return values


def packed(
    n: int,
    columns: dict[str, Any],
    tuples: dict[str, list[np.ndarray]] | None = None,
    nested: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What `pack` makes of `n` items whose every field is already a column (an array of n rows, or a list
    of n values; `nested`: packed dicts, `tuples`: arrays of n rows): the fleet lane builds a snapshot's
    call this way, and a detector replica its answer, with no dict per item."""
    every = list(range(n))
    return {
        _PACKED: True,
        "n": n,
        "columns": {key: (every, value) for key, value in columns.items()},
        "nested": {key: (every, inner) for key, inner in (nested or {}).items()},
        "tuples": {key: (every, parts) for key, parts in (tuples or {}).items()},
    }


def _every_items(payload: dict[str, Any], section: str, key: str) -> Any:
    """What `section` ("columns", "tuples", "nested") of a packed payload holds under `key` when every item
    has it, else None."""
    entry = payload[section].get(key)
    return entry[1] if entry is not None and len(entry[0]) == payload["n"] else None


def full_tuple(payload: dict[str, Any], key: str) -> list[Any] | None:
    """The parts of the tuple column `key` of a packed payload when every item has it, else None."""
    return _every_items(payload, "tuples", key)


def full_column(payload: dict[str, Any], key: str) -> Any:
    """The column `key` of a packed payload when every item has it, else None: what the fleet lane reads of
    a detector's answer without a dict per item."""
    return _every_items(payload, "columns", key)


def nested_items(payload: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The packed dicts under `key` (an answer's `arrays`, its model references) when every item has one,
    else None."""
    return _every_items(payload, "nested", key)


def shared_items(payload: dict[str, Any] | None, count: int) -> list[Any]:
    """The `count` items of a packed payload as dicts, one dict shared by all when every field has one value
    (a lane's call: one version of one fleet model for every machine), else `unpack`'s; Nones without it."""
    if payload is None:
        return [None] * count
    values = {key: value for key, (_, value) in payload["columns"].items()}
    if not payload["nested"] and not payload["tuples"] and all(len(set(v)) == 1 for v in values.values()):
        return [{key: value[0] for key, value in values.items()}] * count
    return unpack(payload)
