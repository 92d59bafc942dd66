"""The service's log in two formats: ``text`` (as it always was) or ``json``, one object a line.

- JSON lines carry ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``, then the
  fields a record brings in ``extra={"fields": {...}}`` (the request log's), an ``exception``
  with its traceback, and for uvicorn's access log its client, method, path and status.
- ``configure_logging`` sets up the root logger; ``uvicorn_log_config`` gives uvicorn's own
  loggers (error and access) the same format, through ``uvicorn.Config(log_config=...)``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a record's ``extra`` holds the structured fields under.
FIELDS = "fields"


def rfc3339(timestamp: float) -> str:
    """``2026-01-31T12:00:00.123Z``: milliseconds, UTC."""
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object a line (no newline inside: tracebacks are escaped in their field)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            # uvicorn's access line: '%s - "%s %s HTTP/%s" %d' % (client, method, path, version, status)
            client, method, path, http_version, status = record.args
            entry.update(client=client, method=method, path=path, http_version=http_version, status=status)
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: str, level: str) -> None:
    """The root logger's format and level for this process (``transfiner serve``, a Ray replica).

    - ``text``: ``logging.basicConfig`` as before (nothing changes where a handler exists).
    - ``json``: one handler on stderr with ``JsonFormatter``, in place of any other; Python's
      warnings go through it too, so every line is JSON."""
    if log_format != "json":
        logging.basicConfig(level=level.upper(), format=TEXT_FORMAT)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """uvicorn's ``log_config`` for the format: None keeps uvicorn's own (text); for JSON, its
    error and access loggers write JSON lines to stderr through the root logger's handler."""
    if log_format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "propagate": False},
            "uvicorn.error": {"propagate": True},
            "uvicorn.access": {"handlers": ["stderr"], "propagate": False},
        },
    }
