"""Process logging: human-readable lines by default, `--log-format json` for log shippers.

Every process (coordinator, node, mount, client commands) configures logging here, once, so
one flag gives one format everywhere (docs/operations.md). A JSON record is one object per
line: time (UTC, ISO 8601), level, process, pid, node (the storage node's id once it has
registered), txid (when the call site passed `extra={"txid": ...}`), logger, message, and exc
for a traceback. The node id lives in a process-wide slot the node sets after registering,
added to every record by a filter.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENV_FORMAT = "DFS_LOG_FORMAT"
ENV_LEVEL = "DFS_LOG_LEVEL"

_process = "dfs"
_node_id: int | None = None


def set_node_id(node_id: int | None) -> None:
    """The storage node's id, known once it has registered; on every record from then on."""
    global _node_id
    _node_id = node_id


def default_format() -> str:
    fmt = os.environ.get(ENV_FORMAT, "text").lower()
    return fmt if fmt in FORMATS else "text"


class ContextFilter(logging.Filter):
    """Stamps each record with the process name and node id (the parts no call site knows)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = _process
        if not hasattr(record, "node_id"):
            record.node_id = _node_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, one line each; fields with no value are left out."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "process": getattr(record, "process_name", _process),
            "pid": record.process,
            "node": getattr(record, "node_id", _node_id),
            "txid": getattr(record, "txid", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps({k: v for k, v in doc.items() if v is not None}, default=str)


def level_from_env(default: str) -> int:
    name = os.environ.get(ENV_LEVEL, default).upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.getLevelName(default.upper())


def setup(
    process: str,
    fmt: str | None = None,
    *,
    level: int | None = None,
    default_level: str = "INFO",
    path: Path | None = None,
) -> logging.Handler:
    """Send every logger's records to stderr (or `path`) in `fmt`; the handler installed."""
    global _process
    _process = process
    fmt = fmt or default_format()
    handler: logging.Handler
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    logging.basicConfig(
        level=level if level is not None else level_from_env(default_level),
        handlers=[handler],
        force=True,
    )
    return handler
