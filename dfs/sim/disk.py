"""A simulated disk that loses what was not forced when its process crashes."""

from __future__ import annotations

from typing import Any

_GONE = object()


class SimDisk:
    """A key/value disk: writes are pending until `force`; `crash` drops pending writes.

    `lose_unforced=False` models a disk that never loses anything (for planted-bug baselines).
    """

    def __init__(self) -> None:
        self.durable: dict[Any, Any] = {}
        self.pending: dict[Any, Any] = {}
        self.forces = 0

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self.pending:
            value = self.pending[key]
            return default if value is _GONE else value
        return self.durable.get(key, default)

    def put(self, key: Any, value: Any) -> None:
        self.pending[key] = value

    def delete(self, key: Any) -> None:
        self.pending[key] = _GONE

    def keys(self) -> list[Any]:
        live = {k for k, v in self.pending.items() if v is not _GONE}
        gone = {k for k, v in self.pending.items() if v is _GONE}
        return sorted((set(self.durable) - gone) | live, key=repr)

    def force(self) -> None:
        for key, value in self.pending.items():
            if value is _GONE:
                self.durable.pop(key, None)
            else:
                self.durable[key] = value
        self.pending.clear()
        self.forces += 1

    def crash(self) -> None:
        self.pending.clear()
