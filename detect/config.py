"""Configs from plain mappings (CLI `--set`, YAML, saved bundles, Ray Tune samples): an unknown key is an
error that names it, never silently dropped."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

T = TypeVar("T")


def config_dataclass(cls: type[T]) -> type[T]:
    """A dataclass whose values pydantic validates against the field types (`--set hidden=abc` fails
    naming `hidden`), refusing unknown keys; still a dataclass (`asdict`, `fields`). It gains
    `from_dict` (`config_from_dict`) unless it defines its own."""
    if "from_dict" not in cls.__dict__:
        cls.from_dict = classmethod(config_from_dict)  # type: ignore[attr-defined]
    return dataclass(config=ConfigDict(extra="forbid"))(cls)


def config_from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """`cls(**data)` for a dataclass config, refusing keys it does not have, by name."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)
