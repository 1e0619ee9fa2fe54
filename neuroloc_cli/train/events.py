"""What a training run reports as it goes, and the JSONL log that records it.

Each event is a small frozen dataclass: the progress bar and a resumed run read its fields,
and `to_dict` gives the log's JSON object — `event` (the kind) first, then the fields in the
order they are declared here, which is the order of the keys in every log line:

    {"time": 1718000000.123, "event": "step", "step": 3, "loss": 2.5, "lr": 5e-05, ...}

The log is appended to line by line while the run trains (`RUN_DIR/log.jsonl` or `--log`), so
that a run killed at any moment has a log of what it did, at worst with a half-written last line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from neuroloc_cli.io.commit import note_written


class _Event:
    """The log form shared by every event."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON object for the log: `event` (its kind), then its fields."""
        return {"event": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class StartEvent(_Event):
    """The run begins (or resumes at `step`): what trains and what it costs, and the data's framing."""

    kind: ClassVar[str] = "start"
    step: int
    total_steps: int
    seq_len: int
    seq_len_default: bool  # no --seq-len was given: the value was chosen from the model's positions
    positions: int | None
    parameters: int
    trainable: int
    frozen: int
    optimizer_elements: int
    optimizer_state_bytes: int
    world_size: int
    framing: dict[str, Any]  # `Framing.describe()`
    warnings: list[str]


@dataclass(frozen=True)
class StepEvent(_Event):
    """An optimizer step is done."""

    kind: ClassVar[str] = "step"
    step: int
    loss: float  # mean NLL over the scored targets of the step's global batch
    lr: float
    grad_norm: float | None  # before clipping; None without --grad-clip
    tokens: int  # row positions trained on so far, padding included
    tokens_per_s: float  # since this process started training
    trainable: int


@dataclass(frozen=True)
class EvalEvent(_Event):
    """Held-out perplexity, at step 0, every --eval-every steps, and at the end."""

    kind: ClassVar[str] = "eval"
    step: int
    perplexity: dict[str, float]  # corpus path -> perplexity


@dataclass(frozen=True)
class CheckpointEvent(_Event):
    """A periodic checkpoint is written."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


Event = StartEvent | StepEvent | EvalEvent | CheckpointEvent
_KINDS: dict[str, type[_Event]] = {cls.kind: cls for cls in (StartEvent, StepEvent, EvalEvent, CheckpointEvent)}


def event_from_dict(doc: dict[str, Any]) -> Event:
    """The event of a log line's JSON object (its `time` and unknown keys are ignored).

    Raises:
        ValueError: the object is not an event of a known kind with all its fields.
    """
    cls = _KINDS.get(doc.get("event")) if isinstance(doc, dict) else None
    if cls is None:
        raise ValueError(f"not a training event: {doc!r}"[:200])
    try:
        return cls(**{f.name: doc[f.name] for f in fields(cls)})
    except KeyError as e:
        raise ValueError(f"{cls.kind} event without {e}") from None


class EventLog:
    """The run's JSONL log, and the listener (the progress bar) each event is passed on to.

    Args:
        path: the log file; its folder is created with the first event.
        on_event: called with each event after it is logged.
    """

    def __init__(self, path: Path, on_event: Callable[[Event], None] | None = None):
        self.path = path
        self.on_event = on_event or (lambda event: None)

    def write(self, event: Event) -> None:
        """Append `event` as one line, stamped with the time, then pass it on."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **event.to_dict()}, default=str) + "\n")
        note_written(self.path)
        self.on_event(event)

    def rewind(self, step: int) -> list[Event]:
        """Cut the log back to `step`, for a run resumed from its checkpoint there: drop the
        lines of later steps (the resumed run writes them again) and a line a killed run left
        half-written. Returns the events kept, oldest first; none when there is no log."""
        if not self.path.is_file():
            return []
        from neuroloc_cli.io.output import atomic_file  # lazily: the command line imports this module

        kept = [(line, event) for line in self.path.read_text().splitlines() if (event := _parse(line)) and event.step <= step]
        with atomic_file(self.path, "training log") as tmp:  # a kill mid-rewrite keeps the old log
            tmp.write_text("".join(line + "\n" for line, _ in kept))
        return [event for _, event in kept]


def _parse(line: str) -> Event | None:
    """The event of a log line; None for a line that is not one (cut short by `kill -9`)."""
    try:
        return event_from_dict(json.loads(line))
    except ValueError:  # json.JSONDecodeError is one
        return None
