"""Appended log segments (`raytwin.logsegments`): torn tails, reads while a writer appends, the key
index catching up on a growing segment, compaction of closed segments only, and a writer killed
with SIGKILL in the middle of appending."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import pytest

from raytwin import logsegments
from raytwin.keyindex import Logged, LogKeyIndex, content_digest
from raytwin.logsegments import is_segment, read_segment
from raytwin.statestore import LoggedEvent, StateStore, log_table, to_micros

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ev(k: int) -> LoggedEvent:
    us = to_micros(T0 + timedelta(seconds=k))
    return LoggedEvent((us, k, f"a:{k}"), "good", {"h1": 0.5 * k}, us)


def _batch(*ks: int):
    return log_table([("a", _ev(k)) for k in ks])


def _segments(store: StateStore) -> list[str]:
    store.fs.invalidate_cache()
    return sorted(p for p in store.fs.glob(f"{store.root}/log/tenant=acme/date=*/*") if is_segment(p.rsplit("/", 1)[-1]))


def _keys(store: StateStore) -> list[int]:
    return [e.key[1] for e in store.read_events("acme", "a")]


def test_batches_append_to_one_segment_that_readers_see_while_it_is_open(tmp_path):
    writer, reader = StateStore(str(tmp_path)), StateStore(str(tmp_path))
    for k in range(5):
        writer.append_log("acme", _batch(2 * k, 2 * k + 1))
        assert _keys(reader) == list(range(2 * k + 2))  # another process's reader, before any close
    [segment] = _segments(writer)
    batches, end = read_segment(segment)
    assert [b.num_rows for b in batches] == [2] * 5 and end == os.path.getsize(segment)


def test_a_torn_tail_is_not_read_and_nothing_is_appended_after_it(tmp_path, monkeypatch):
    store = StateStore(str(tmp_path))
    store.append_log("acme", _batch(0, 1))
    [segment] = _segments(store)
    whole = os.path.getsize(segment)
    store.append_log("acme", _batch(2))
    store.close_segments()
    with open(segment, "r+b") as f:  # the second batch's message cut short, as a killed writer leaves it
        f.truncate(os.path.getsize(segment) - 7)
    assert _keys(StateStore(str(tmp_path))) == [0, 1]
    assert read_segment(segment)[1] == whole

    def dies_midway(fd, data):  # a write that fails after part of the message
        os.write(fd, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(logsegments, "_write_all", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        store.append_log("acme", _batch(3))
    monkeypatch.undo()
    store.append_log("acme", _batch(4))  # the failed segment (no batch in it: deleted) is abandoned: a new one
    assert len(_segments(store)) == 2 and _keys(store) == [0, 1, 4]


def test_appends_refused_by_a_full_disk_leave_no_empty_segment_and_keep_every_acknowledged_batch(tmp_path,
                                                                                                   monkeypatch):
    """Each batch refused for ENOSPC left a 0-byte `seg-*.arrows`: a producer resending every 2 s for an hour
    left ~1,800 per shard and tenant, listed on every recovery."""
    store = StateStore(str(tmp_path))
    write_all = logsegments._write_all

    def full(fd, data):  # the disk fills: a write fails after part of what it was given
        os.write(fd, data[: len(data) // 3])
        raise OSError(28, "No space left on device")

    store.append_log("acme", _batch(0, 1))
    [kept] = _segments(store)
    monkeypatch.setattr(logsegments, "_write_all", full)
    for k in range(2, 6):  # the open segment (a batch in it) abandoned, then a new one per try, its header refused
        with pytest.raises(OSError, match="No space left"):
            store.append_log("acme", _batch(k))
    assert _segments(store) == [kept]  # the one with an acknowledged batch stays, no empty one
    header_only: list[bytes] = []

    def header_then_full(fd, data):  # a new segment's header written, its first batch refused
        if not header_only:
            header_only.append(data)
            return write_all(fd, data)
        return full(fd, data)

    monkeypatch.setattr(logsegments, "_write_all", header_then_full)
    with pytest.raises(OSError, match="No space left"):
        store.append_log("acme", _batch(6))
    assert header_only and _segments(store) == [kept]
    monkeypatch.undo()
    store.append_log("acme", _batch(7))  # space again
    assert len(_segments(store)) == 2 and _keys(store) == [0, 1, 7]


def _cut_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "event=log_segment_cut" in r.getMessage()]


def test_a_cut_closed_segment_keeps_its_readable_rows_and_says_its_tail_is_lost(tmp_path, caplog):
    """A segment truncated by hand or a bad disk lost acknowledged events without a word (a twin went back
    from revision 1314 to 840): its readable rows are kept and one error line names the file, the rows kept
    and the bytes lost, however often it is read; a segment its writer still holds is not reported."""
    store = StateStore(str(tmp_path))
    for k in range(3):
        store.append_log("acme", _batch(3 * k, 3 * k + 1, 3 * k + 2))
    [segment] = _segments(store)
    with caplog.at_level(logging.ERROR, logger="raytwin.store"):
        with open(segment, "ab") as f:  # a writer mid-append: its partial message is not reported
            f.write(b"\xff\xff\xff\xff\x10")
        assert _keys(StateStore(str(tmp_path))) == list(range(9)) and not _cut_lines(caplog)
        store.close_segments()
        size = os.path.getsize(segment)
        with open(segment, "r+b") as f:  # cut in the middle of the second batch's message
            f.truncate(size // 2)
        assert _keys(StateStore(str(tmp_path))) == [0, 1, 2]
        assert _keys(StateStore(str(tmp_path))) == [0, 1, 2]  # read again: reported once
    [line] = _cut_lines(caplog)
    kept = read_segment(segment)[1]
    assert line.levelno == logging.ERROR and f"file={segment} rows_kept=3 bytes_kept={kept} " in line.getMessage()
    assert f"bytes_lost={size // 2 - kept}" in line.getMessage()
    caplog.clear()
    store.append_log("acme", _batch(9, 10))
    store.append_log("acme", _batch(11))
    store.close_segments()
    [second] = set(_segments(store)) - {segment}
    with open(second, "r+b") as f:
        f.truncate(os.path.getsize(second) - 7)
    with caplog.at_level(logging.ERROR, logger="raytwin.store"):
        [done] = StateStore(str(tmp_path)).compact()  # it locks the segments it reads: they are still reported
    assert done.rows_in == 5 and [f"file={second} rows_kept=2 " in r.getMessage() for r in _cut_lines(caplog)] == [True]


def test_the_key_index_reads_only_what_a_segment_gained(tmp_path):
    store = StateStore(str(tmp_path))
    index = LogKeyIndex(store)

    def ask(*ks: int) -> list[Logged]:
        return index.lookup("acme", [("a", _ev(k).key, content_digest("good", _ev(k).values.items())) for k in ks])

    store.append_log("acme", _batch(0, 1))
    assert ask(0, 1, 2) == [Logged.SAME, Logged.SAME, Logged.ABSENT]
    [segment] = _segments(store)
    [part] = index._cache.values()
    covered, built = part.files[segment.rsplit("/", 1)[-1]], index.rebuilds
    store.append_log("acme", _batch(2, 3))
    assert ask(0, 2, 3, 4) == [Logged.SAME, Logged.SAME, Logged.SAME, Logged.ABSENT]
    assert index.rebuilds == built and part.files[segment.rsplit("/", 1)[-1]] > covered  # caught up, not rebuilt
    assert LogKeyIndex(store).lookup("acme", [("a", _ev(3).key, content_digest("bad", {}.items()))]) == [Logged.CONFIRM]


def test_compaction_takes_closed_segments_only(tmp_path, monkeypatch):
    writer, compactor = StateStore(str(tmp_path)), StateStore(str(tmp_path))
    writer.append_log("acme", _batch(0, 1))
    assert compactor.compact() == []  # the writer may still append to its segment
    monkeypatch.setattr(logsegments, "SEGMENT_MAX_AGE_S", 0.0)  # every append starts a new segment
    writer.append_log("acme", _batch(2))
    [done] = compactor.compact()  # the first segment is closed now, the second is open
    assert (done.files_in, done.rows_in) == (1, 2) and len(_segments(writer)) == 1
    writer.append_log("acme", _batch(3))
    assert _keys(compactor) == [0, 1, 2, 3]
    writer.close_segments()
    [done] = compactor.compact()
    assert done.files_in == 2 and not _segments(writer) and _keys(compactor) == [0, 1, 2, 3]


WRITER = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime, timedelta
    from raytwin.statestore import LoggedEvent, StateStore, log_table, to_micros
    store = StateStore(sys.argv[1])
    t0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    for b in range(100_000):
        rows = []
        for k in range(50 * b, 50 * b + 50):
            us = to_micros(t0 + timedelta(milliseconds=k))
            rows.append(("a", LoggedEvent((us, k, f"a:{k}"), "good", {"h1": float(k)}, us)))
        store.append_log("acme", log_table(rows))
        print(b, flush=True)  # acknowledged
""")


def test_a_writer_killed_mid_append_loses_and_duplicates_nothing_acknowledged(tmp_path):
    """SIGKILL while a writer appends as fast as it can: every acknowledged batch is read back once,
    at most the one in flight besides, and a new writer's batches follow it."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked == 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for line in proc.stdout:  # acknowledgements printed before the kill
        acked = int(line)
    store = StateStore(str(tmp_path))
    keys = [e.key[1] for e in store.read_events("acme", "a")]
    assert keys[: 50 * (acked + 1)] == list(range(50 * (acked + 1)))
    assert keys in (list(range(50 * (acked + 1))), list(range(50 * (acked + 2))))
    us = to_micros(T0 + timedelta(hours=5))  # the same day's partition
    store.append_log("acme", log_table([("a", LoggedEvent((us, 0, "a:next"), "good", {"h1": 1.0}, us))]))
    assert [e.key[2] for e in store.read_events("acme", "a")][-1] == "a:next"
