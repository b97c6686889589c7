"""The controller's log lines: uvicorn's logging configuration with ticket values redacted
everywhere, as plain text on a terminal or as JSON, one event per line, for a log collector.

A JSON line carries ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``, ``event`` (the
message) and, where the event concerns one, the fields in :data:`FIELDS` (``session_id``,
``user_id``, ``step``, ...), given by the code that logs through ``extra=``. Only those
names are taken from ``extra``: whatever else a library attaches to a record stays out, so a
new field is a decision made here. Ticket values are redacted from every string of the event
(message, fields, traceback); no code logs credentials, API keys, VNC passwords, agent
tokens or upstream logins (a test runs a whole sign-in and looks for each in the lines).
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, WrappedLogger

from master_controller.auth import TicketRedaction, redact_tickets

LogFormat = Literal["auto", "json", "console"]

# what a log call may attach through ``extra=`` (and nothing else)
FIELDS = (
    "session_id",
    "user_id",
    "provider",
    "step",
    "state",
    "ok",
    "seconds",
    "reason",
    "guest_id",
    "api_key",
    "upstream",
)


def resolve(fmt: LogFormat) -> Literal["json", "console"]:
    """``auto``: plain text on a terminal, JSON otherwise (a service's journal, a file)."""
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


def _redact(logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
    return {k: redact_tickets(v) if isinstance(v, str) else v for k, v in event.items()}


def json_formatter() -> logging.Formatter:
    """A formatter turning every standard logging record into one JSON line."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(allow=FIELDS),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
    )


def log_config(fmt: LogFormat = "console") -> dict[str, Any]:
    """uvicorn's logging configuration, plus: ticket values redacted in every handler, the
    controller's own loggers (``master_controller.*``) at INFO on stderr, and with ``json``
    every handler writing JSON lines."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_tickets": {"()": TicketRedaction}}
    json_lines = resolve(fmt) == "json"
    if json_lines:
        config["formatters"]["json"] = {"()": json_formatter}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact_tickets"]
        if json_lines:
            handler["formatter"] = "json"
    config["loggers"]["master_controller"] = {
        "handlers": ["default"],
        "level": "INFO",
        "propagate": False,
    }
    return config
