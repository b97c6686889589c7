"""Named steps with timings.

Long operations (an image build, a guest start, a verification) are a list of named steps.
Each step is logged with its duration: on a terminal as a live progress display (rich), in
logs as plain lines. The same step names appear in results (:class:`StepRecord`) so APIs,
events and metrics can quote them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from rich.console import Console

Display = Literal["rich", "plain", "quiet"]


@dataclass
class StepRecord:
    name: str
    seconds: float = 0.0
    ok: bool = False
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "detail": self.detail,
        }


# where an async caller sends each finished step (a session's events, say)
StepSink = Callable[["StepRecord"], Awaitable[None]]


@dataclass
class StepLog:
    """Times and records named steps, and shows them as they run."""

    display: Display = "quiet"
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    on_record: Callable[[StepRecord], None] | None = None
    records: list[StepRecord] = field(default_factory=list)

    @classmethod
    def for_stream(cls, stream: TextIO = sys.stderr) -> StepLog:
        """Rich progress on a terminal, plain lines otherwise."""
        return cls(display="rich" if stream.isatty() else "plain", stream=stream)

    @contextmanager
    def step(self, name: str) -> Iterator[StepRecord]:
        """Time the block as step ``name``; a failing block is recorded ``ok=False``, re-raised."""
        record = StepRecord(name=name)
        console = Console(file=self.stream) if self.display == "rich" else None
        status = console.status(f"[bold]{name}[/] ...") if console else None
        if status is not None:
            status.start()
        elif self.display == "plain":
            print(f"step {name}: started", file=self.stream, flush=True)
        started = time.monotonic()
        try:
            yield record
            record.ok = True
        except BaseException as exc:
            if not record.detail:
                record.detail = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise
        finally:
            record.seconds = time.monotonic() - started
            self.records.append(record)
            if status is not None:
                status.stop()
            self._show(record, console)
            if self.on_record is not None:
                self.on_record(record)

    def _show(self, record: StepRecord, console: Console | None) -> None:
        mark = "ok" if record.ok else "FAILED"
        detail = f" ({record.detail})" if record.detail else ""
        if console is not None:
            colour = "green" if record.ok else "red"
            console.print(
                f"[{colour}]{mark:>6}[/] {record.name} [dim]{record.seconds:.1f}s{detail}[/]"
            )
        elif self.display == "plain":
            print(
                f"step {record.name}: {mark} in {record.seconds:.1f}s{detail}",
                file=self.stream,
                flush=True,
            )

    def total_seconds(self) -> float:
        return sum(r.seconds for r in self.records)
