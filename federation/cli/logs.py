"""How `fedseek` logs: plain lines for a terminal, or one JSON object a line for a log shipper.

Both carry UTC timestamps with milliseconds, so an operator lines them up with audit records and
other hosts' logs. JSON (`--log-format json` or FEDSEEK_LOG_FORMAT=json) is for journald, Loki or
Elasticsearch under a service unit: `ts`, `level`, `logger`, `msg`, `pid` (and `exc` with a traceback).
The RedactingFilter runs on every handler before either formatter sees a record.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["plain", "json"]
FORMATS: tuple[LogFormat, ...] = ("plain", "json")
ENV = "FEDSEEK_LOG_FORMAT"
PLAIN = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        line = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def default_format() -> str:
    """FEDSEEK_LOG_FORMAT, else plain (what a person at a terminal reads)."""
    return os.environ.get(ENV, "plain") or "plain"


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    plain = logging.Formatter(PLAIN, datefmt="%Y-%m-%dT%H:%M:%S")
    plain.converter = time.gmtime
    return plain
