"""Logging set-up for `__main__`; libraries only name their loggers.

Every record gets the current span's `trace_id` and `span_id` (empty outside
a span), so a log line leads to its trace in Tempo. `json=True` writes one
JSON object per line for a log collector; otherwise a plain line for people.
`ESCAPEMENT_LOG_FORMAT=json` asks `telemetry()` (every service's `__main__`)
for JSON (`log_format_json`).
"""

from __future__ import annotations

import json as _json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace

# The attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_TRACE_FIELDS = frozenset({"trace_id", "span_id"})


LOG_FORMAT_VARIABLE = "ESCAPEMENT_LOG_FORMAT"  # "text" (default) or "json"


def log_format_json(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `ESCAPEMENT_LOG_FORMAT` asks for JSON lines (anything but json/text: a warning)."""
    value = (os.environ if environ is None else environ).get(LOG_FORMAT_VARIABLE, "").strip()
    if value.lower() not in ("", "text", "json"):
        print(f"{LOG_FORMAT_VARIABLE}={value!r}: expected text or json", file=sys.stderr)
    return value.lower() == "json"


class TraceContextFilter(logging.Filter):
    """Adds `trace_id` and `span_id` of the current span to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        else:
            record.trace_id = record.span_id = ""
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            line += f" [trace_id={trace_id} span_id={getattr(record, 'span_id', '')}]"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, trace ids, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("trace_id", "span_id"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _TRACE_FIELDS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _json.dumps(out, default=str, ensure_ascii=False)


class _EscapementHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler `setup_logging` installed, so a second call replaces it."""


def setup_logging(
    level: str | int = "INFO", json: bool = False, stream: IO[str] | None = None
) -> None:
    """Send all logs to `stream` (stderr) at `level`, as text or JSON lines.

    Replaces a handler installed by an earlier call; leaves others alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _EscapementHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _EscapementHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
