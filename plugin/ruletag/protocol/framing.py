"""The frame reader: split a byte stream into complete top-level msgpack objects.

One streaming ``msgpack.Unpacker`` per connection finds frame boundaries with ``skip()`` (in C,
resumable across reads, bounded by ``max_frame_size`` while buffering).
"""

from __future__ import annotations

from typing import Final

import msgpack

from ruletag.errors import LocalProtocolError, RemoteProtocolError

_FEED_STEP: Final = 256 * 1024  # bytes handed to the streaming unpacker at a time
_COMPACT_AT: Final = 1024 * 1024  # drop consumed bytes from the receive buffer past this


class FrameReader:
    """Split a byte stream into complete top-level msgpack objects, bounded in size."""

    def __init__(self, max_frame_size: int) -> None:
        self._max = max_frame_size
        self._unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max_frame_size)
        self._buf = bytearray()
        self._base = 0  # stream offset of self._buf[0]
        self._fed = 0  # stream offset up to which bytes went to the unpacker
        self._frame_start = 0  # stream offset of the current frame
        self.eof = False

    def receive(self, data: bytes) -> None:
        if self.eof:
            raise LocalProtocolError("receive_data() after EOF")
        if data:
            self._buf += data
        else:
            self.eof = True

    def next_frame(self) -> bytes | None:
        """The next complete frame, or None when more bytes are needed (or at a clean EOF)."""
        while True:
            try:
                self._unpacker.skip()
            except msgpack.OutOfData:
                if self._feed():
                    continue
                if self.eof and self._fed > self._frame_start:
                    raise RemoteProtocolError(
                        "connection closed in the middle of a message"
                    ) from None
                return None
            end = self._unpacker.tell()
            lo = self._frame_start - self._base
            frame = bytes(self._buf[lo : end - self._base])
            self._frame_start = end
            consumed = end - self._base
            if consumed >= _COMPACT_AT or consumed == len(self._buf):
                del self._buf[:consumed]
                self._base = end
            return frame

    def _feed(self) -> bool:
        available = self._base + len(self._buf) - self._fed
        if not available:
            return False
        room = self._max - (self._fed - self._frame_start)
        if room <= 0:
            raise RemoteProtocolError(f"message larger than max_frame_size ({self._max} bytes)")
        step = min(available, room, _FEED_STEP)
        lo = self._fed - self._base
        self._unpacker.feed(memoryview(self._buf)[lo : lo + step])
        self._fed += step
        return True
