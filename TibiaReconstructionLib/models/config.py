"""JSON-able architecture settings shared by the model classes."""

from __future__ import annotations

from dataclasses import asdict, fields

from ..errors import InputError


class ArchConfig:
    """Mixin for dataclass settings: ``from_dict`` rejects unknown keys, ``to_dict`` gives plain JSON values."""

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"type"}
        if unknown:
            raise InputError(f"Unknown {cls.__name__} settings {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)
