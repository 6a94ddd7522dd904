"""Daphne's TCP connections send a chunk at once when nothing is queued ahead of it.

Twisted sends every write on the reactor's next turn, at two ``epoll_ctl`` calls and several layers of Python per
write, and a streamed response writes one chunk per token on the event loop the batching thread needs. Why, and what
stays Twisted's: docs/architecture.md, "Why each patch".
"""

from __future__ import annotations

from twisted.internet import tcp

# The requirements this patch was written against; tests/test_patch_pins.py holds requirements.txt to them.
WRITTEN_AGAINST = {"Twisted": "==26.10.0", "daphne": "==4.2.3"}


class EagerServer(tcp.Server):
    """A server-side TCP connection that sends a write at once when its queue is empty."""

    def write(self, data: bytes) -> None:
        if not self._send_now(data):
            super().write(data)

    def writeSequence(self, iovec) -> None:  # noqa: N802 - Twisted's name
        data = b"".join(iovec)
        if not self._send_now(data):
            super().write(data)

    def _send_now(self, data: bytes) -> bool:
        """Send ``data`` now if nothing is queued; queue what the socket did not take. False: queue it all."""
        if (
            self.TLS
            or not self.connected
            or self.disconnecting
            or self._writeDisconnected
            or self._tempDataLen
            or self.offset < len(self.dataBuffer)
            or not isinstance(data, bytes)
        ):
            return False
        sent = self.writeSomeData(data)
        if isinstance(sent, Exception):
            return False  # queued, Twisted's next write attempt meets the error and closes the connection
        if sent < len(data):
            super().write(data[sent:])
        return True


def install() -> None:
    """Make every TCP port that this process opens from now on hand out ``EagerServer`` connections."""
    tcp.Port.transport = EagerServer
