"""Planted bugs: known-wrong versions of the real drivers, to prove the simulator finds them.

Each is the real class with one rule broken, swapped in for the length of a run, so what is
proven is that the simulator would catch that bug in the code that runs, not in a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_BUGS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {}

BUGS: tuple[str, ...] = ()


@contextlib.contextmanager
def planted(bug: str | None) -> Iterator[None]:
    if bug is None:
        yield
        return
    if bug not in _BUGS:
        raise ValueError(f"unknown planted bug {bug!r} (known: {', '.join(sorted(_BUGS))})")
    with _BUGS[bug]():
        yield
