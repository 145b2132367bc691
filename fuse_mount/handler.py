"""Errno discipline for request handlers (docs/design.md §7: errors are errno, never a traceback).

pyfuse3 lets a handler raise only FUSEError; anything else would end the main loop. So every
handler is wrapped: a DfsError becomes its errno (`dfs.errors.ERRNO`), a local OSError keeps its
errno, and anything unexpected is logged with its traceback and answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from dfs.errors import Code, DfsError

log = logging.getLogger("fuse_mount")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
NAME_MAX = 255
#: Errors that are answers, not failures: logged at debug level only.
EXPECTED = frozenset(
    {
        Code.ENOENT, Code.EEXIST, Code.ENOTEMPTY, Code.ENOTDIR, Code.EISDIR, Code.ENODATA,
        Code.ENAMETOOLONG, Code.EINVAL, Code.EPERM,
    }
)


def handler(fn: F) -> F:
    """Turn every failure into an errno for the kernel; log what is not a plain answer.
    With metrics (`self.metrics`, dfs.metrics.mount.MountMetrics) every request is timed and
    its errno counted, here, for every op at once."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any) -> Any:
        metrics = getattr(self, "metrics", None)
        started = time.perf_counter() if metrics is not None else 0.0
        ok = False
        try:
            result = await fn(self, *args)
            ok = True
            return result
        except pyfuse3.FUSEError:
            raise
        except DfsError as e:
            level = logging.DEBUG if e.code in EXPECTED else logging.WARNING
            log.log(level, "%s%s: %s", name, _brief(args), e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            log.warning("%s%s: %s", name, _brief(args), e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%s failed", name, _brief(args))
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if metrics is not None:
                metrics.observe(name, time.perf_counter() - started, ok)

    return wrapper  # type: ignore[return-value]


def _brief(args: Sequence[Any]) -> str:
    """Arguments for a log line: numbers and names, never file data."""
    shown = []
    for a in args:
        if isinstance(a, bytes):
            shown.append(repr(a) if len(a) <= 64 else f"<{len(a)} bytes>")
        elif isinstance(a, int):
            shown.append(str(a))
        else:
            shown.append(type(a).__name__)
    return "(" + ", ".join(shown) + ")"


def check_name(name: bytes) -> None:
    """Names the cluster would refuse anyway, answered locally as a local disk would."""
    if len(name) > NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
