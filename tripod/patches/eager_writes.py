"""Daphne's TCP connections send a chunk at once when nothing is queued ahead of it.

Twisted queues every write and sends it on the reactor's next turn. To do that it registers the socket
for writability (one ``epoll_ctl``), wakes up, sends, and unregisters the socket (a second
``epoll_ctl``), all through several layers of Python. A streamed response writes one small chunk per
token, so under load most of the event loop's work was this dance, and the loop holds the GIL that the
engine's batching thread needs between steps.

Here a write with nothing queued ahead of it goes to the socket straight away. What the socket does
not take, and any write while data is queued, goes through Twisted's queue as before, so order, flow
control and the handling of a lost connection stay Twisted's.
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
