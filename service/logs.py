"""The server's log: one record per HTTP request and per life-cycle event (started, model loaded,
draining, shutdown, fatal errors, warnings), as readable lines (--log-format text) or as one JSON
object per line (--log-format json).

A record names its event and carries its fields (`event(...)`); the text format shows the message
alone, which already says what the fields say, and the JSON format writes the fields as keys.
Records without an event (uvicorn's own) are `"event": "log"` in JSON.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

# keys every JSON object has; a field of the same name does not replace them
BASE_KEYS = ("ts", "level", "logger", "event", "message")


def event(
    logger: logging.Logger, name: str, message: str, level: int = logging.INFO, exc_info=None, **fields
) -> None:
    """Log event `name` with its fields (None values are left out)."""
    fields = {k: v for k, v in fields.items() if v is not None}
    logger.log(level, message, exc_info=exc_info, extra={"event": name, "fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, event, message, then the
    record's fields; a traceback goes into `exception`, so every record stays one line."""

    def __init__(self, *args, **kwargs):  # dictConfig may pass uvicorn's formatter options: unused
        super().__init__()

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc)
        entry = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        for key, value in getattr(record, "fields", {}).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)
