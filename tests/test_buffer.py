"""The durable disk buffer's invariants (see the docstring of ruletag.buffer)."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ruletag.delivery.buffer import DiskBuffer
from ruletag.errors import BufferFullError
from ruletag.protocol import Chunk


def chunk(i: int, chunk_id: bytes | None = None, size: int = 100) -> Chunk:
    return Chunk(tag=f"t.{i}", entries=bytes([i % 256]) * size, count=1, chunk_id=chunk_id)


def test_append_survives_reopen_and_ack_removes(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path)
    assert buf.open().pending == 0
    ids = [buf.append(chunk(i)) for i in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    buf.ack(2)
    buf.close()

    again = DiskBuffer(tmp_path)
    report = again.open()
    assert report.pending == 4 and report.problems == []
    assert [i for i, _ in again.pending()] == [1, 3, 4, 5]
    assert again.get(3) == chunk(2)  # id 3 holds the third chunk appended
    # ids keep growing across restarts
    assert again.append(chunk(9)) == 6


def test_torn_tail_is_reported_truncated_and_never_fatal(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path)
    buf.open()
    buf.append(chunk(1))
    buf.append(chunk(2))
    buf.close()
    seg = sorted(tmp_path.glob("segment-*.log"))[-1]
    data = seg.read_bytes()
    seg.write_bytes(data[:-7])  # a crash in the middle of the second write

    again = DiskBuffer(tmp_path)
    report = again.open()
    assert [i for i, _ in again.pending()] == [1]
    assert len(report.problems) == 1 and "torn or corrupt" in report.problems[0]
    # the torn tail was cut, so new appends are readable after another restart
    again.append(chunk(3))
    again.close()
    third = DiskBuffer(tmp_path)
    assert third.open().problems == []
    assert [c.tag for _, c in third.pending()] == ["t.1", "t.3"]


def test_flipped_byte_is_caught_by_checksum(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path)
    buf.open()
    buf.append(chunk(1))
    buf.close()
    seg = sorted(tmp_path.glob("segment-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF
    seg.write_bytes(bytes(data))
    again = DiskBuffer(tmp_path)
    report = again.open()
    assert again.pending() == []
    assert report.problems


def test_garbage_file_does_not_crash_open(tmp_path: Path) -> None:
    (tmp_path / "segment-000000000001.log").write_bytes(b"\x00garbage" * 10)
    buf = DiskBuffer(tmp_path)
    report = buf.open()
    assert report.pending == 0 and report.problems


def test_full_buffer_refuses_and_writes_nothing(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path, max_bytes=1000)
    buf.open()
    buf.append(chunk(1, size=400))
    used = buf.bytes_used
    with pytest.raises(BufferFullError):
        buf.append(chunk(2, size=700))
    assert buf.bytes_used == used and buf.chunks == 1
    buf.ack(1)  # space does not come back until the segment can be dropped...
    buf.close()


def test_dedupe_by_upstream_chunk_id(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path)
    buf.open()
    first = buf.append(chunk(1, chunk_id=b"abc=="))
    assert buf.append(chunk(1, chunk_id=b"abc==")) == first
    assert buf.chunks == 1
    buf.ack(first)
    # once delivered, the same id is a new chunk again (fluentd may legitimately reuse it)
    assert buf.append(chunk(1, chunk_id=b"abc==")) != first


def test_fully_acked_segments_are_deleted(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path, segment_bytes=1000)
    buf.open()
    ids = [buf.append(chunk(i, size=300)) for i in range(10)]
    many = len(list(tmp_path.glob("segment-*.log")))
    assert many >= 3
    for i in ids:
        buf.ack(i)
    assert len(list(tmp_path.glob("segment-*.log"))) == 1  # only the active one is left
    buf.close()
    again = DiskBuffer(tmp_path, segment_bytes=1000)
    assert again.open().pending == 0


def test_enospc_leaves_no_partial_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = DiskBuffer(tmp_path)
    buf.open()
    buf.append(chunk(1))

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ruletag.delivery.buffer.os.fsync", no_space)
    with pytest.raises(OSError):
        buf.append(chunk(2))
    monkeypatch.undo()
    assert buf.chunks == 1
    buf.append(chunk(3))  # space came back
    buf.close()
    again = DiskBuffer(tmp_path)
    report = again.open()
    assert report.problems == []
    assert [c.tag for _, c in again.pending()] == ["t.1", "t.3"]


_REAL_WRITE_ERROR = textwrap.dedent("""
    import resource, sys
    from ruletag.delivery.buffer import DiskBuffer
    from ruletag.protocol import Chunk

    def chunk(i, size):
        return Chunk(tag=f"t.{i}", entries=bytes([i]) * size, count=1)

    buf = DiskBuffer(sys.argv[1])
    buf.open()
    buf.append(chunk(1, 100))
    # A real write error (EFBIG past RLIMIT_FSIZE, like ENOSPC) on a record smaller than a
    # write buffer: nothing of it may stay behind to be written after space returns.
    limit = buf.bytes_used + 1500
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for i in (2, 3):
        try:
            buf.append(chunk(i, 3000))
        except OSError:
            pass
        else:
            raise SystemExit("the write past the file size limit did not fail")
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    assert buf.get(buf.append(chunk(4, 100))) == chunk(4, 100)
    buf.close()
""")


def test_real_write_error_leaves_nothing_behind(tmp_path: Path) -> None:
    """A failed write (EFBIG from a file size limit, in a child process) is cut cleanly."""
    plugin = Path(__file__).resolve().parents[1] / "plugin"
    proc = subprocess.run(
        [sys.executable, "-c", _REAL_WRITE_ERROR, str(tmp_path)],
        env={"PYTHONPATH": str(plugin)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    again = DiskBuffer(tmp_path)
    report = again.open()
    assert report.problems == []
    assert [c.tag for _, c in again.pending()] == ["t.1", "t.4"]


def test_oldest_age(tmp_path: Path) -> None:
    buf = DiskBuffer(tmp_path)
    buf.open()
    assert buf.oldest_age() == 0.0
    buf.append(chunk(1))
    assert buf.oldest_age(now=10**10) > 0
