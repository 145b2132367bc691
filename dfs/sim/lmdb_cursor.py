"""The py-lmdb `Cursor` of the simulated engine (dfs/sim/lmdb_model.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dfs.sim.lmdb_disk import DbHandle, Name, check_key

if TYPE_CHECKING:
    from dfs.sim.lmdb_model import Transaction


class Cursor:
    """A py-lmdb cursor: a position by key, so changes made through the txn never confuse it.

    Where an unpositioned LMDB cursor's answer depends on its hidden internal position (prev()
    after running off the end, next() after running off the start or after a set_key miss),
    the model raises NotImplementedError rather than guess; dfs never asks.
    """

    def __init__(self, txn: Transaction, name: Name) -> None:
        self.txn, self.name = txn, name
        self._item: tuple[bytes, bytes] | None = None
        # Unpositioned: "fresh", "end" (next() stays False), "start" (prev() stays False),
        # "empty" (both stay False) or "lost" (a set_key miss).
        self._off = "fresh"

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._item = None

    def _go(self, item: tuple[bytes, bytes] | None, off: str = "end") -> bool:
        self._item = item
        if item is None:
            self._off = off
        return item is not None

    def key(self) -> bytes:
        return self._item[0] if self._item else b""

    def value(self) -> bytes:
        return self._item[1] if self._item else b""

    def item(self) -> tuple[bytes, bytes]:
        return self._item if self._item else (b"", b"")

    def first(self) -> bool:
        self.txn.check()
        return self._go(self.txn.seek(self.name, None, False), "empty")

    def last(self) -> bool:
        self.txn.check()
        return self._go(self.txn.seek_back(self.name, None, False), "empty")

    def next(self) -> bool:
        self.txn.check()
        if self._item is not None:
            return self._go(self.txn.seek(self.name, self._item[0], True), "end")
        if self._off == "fresh":
            return self.first()
        if self._off in ("end", "empty"):
            return False
        raise NotImplementedError(f"next() of a cursor left {self._off}: not modelled")

    def prev(self) -> bool:
        self.txn.check()
        if self._item is not None:
            return self._go(self.txn.seek_back(self.name, self._item[0], True), "start")
        if self._off == "fresh":
            return self.last()
        if self._off in ("start", "empty"):
            return False
        raise NotImplementedError(f"prev() of a cursor left {self._off}: not modelled")

    def setcheck_key(self, key: Any) -> bool:
        self.txn.check()
        key = check_key(key, "mdb_cursor_get")
        value = self.txn.lookup(self.name, key)
        return self._go((key, value) if value is not None else None, "lost")

    def set_range(self, key: Any) -> bool:
        self.txn.check()
        key = bytes(key)
        if not key:
            return self.first()
        return self._go(self.txn.seek(self.name, check_key(key, "mdb_cursor_get"), False), "end")

    def get(self, key: Any, default: Any = None) -> Any:
        return self.value() if self.setcheck_key(key) else default

    def put(self, key: Any, value: Any, dupdata: bool = False, overwrite: bool = True,
            append: bool = False) -> bool:
        db = DbHandle(self.name)
        done = self.txn.put(key, value, overwrite=overwrite, db=db)
        self.setcheck_key(key)
        return done

    def delete(self, dupdata: bool = False) -> bool:
        """Delete the current item and move to the next one; False when not positioned."""
        self.txn.check(writing=True)
        if self._item is None:
            return False
        key = self._item[0]
        self.txn.delete(key, db=DbHandle(self.name))
        self._go(self.txn.seek(self.name, key, True), "end")
        return True

    def iternext(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        if self._item is None:
            self.first()
        while self._item is not None:
            k, v = self._item
            yield (k, v) if keys and values else k if keys else v
            self.next()

    def iterprev(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        if self._item is None:
            self.last()
        while self._item is not None:
            k, v = self._item
            yield (k, v) if keys and values else k if keys else v
            self.prev()

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self.iternext()
