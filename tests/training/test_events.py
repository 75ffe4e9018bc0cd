"""events.jsonl: appended one line per event, readable line by line past a kill's torn line."""

from __future__ import annotations

import json
from pathlib import Path

from segnet.training.events import EventLog, read_events


def test_each_event_is_one_json_line_appended(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = EventLog(path)
    events.emit("started", 0)
    events.emit("checkpoint_saved", 2, path="run/checkpoints/ckpt-2")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["started", "checkpoint_saved"]
    assert read_events(path)[1] == {**json.loads(lines[1]), "step": 2}
    assert read_events(path, offset=len(lines[0]) + 1)[0]["path"] == "run/checkpoints/ckpt-2"


def test_a_line_cut_by_a_kill_is_skipped_and_not_glued_to_the_next(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).emit("started", 0)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"time": 1.0, "event": "checkpoint_sa')  # SIGKILL mid-write
    assert [e["event"] for e in read_events(path)] == ["started"]
    EventLog(path).emit("restored", 0, path="ckpt-0")  # the next process
    assert [e["event"] for e in read_events(path)] == ["started", "restored"]


def test_a_worker_that_is_not_the_chief_writes_nothing(tmp_path: Path) -> None:
    EventLog(None).emit("started", 0)
    assert read_events(tmp_path / "events.jsonl") == []
    assert not list(tmp_path.iterdir())
