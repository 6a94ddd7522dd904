"""``EagerServer`` sends a write at once only when nothing is queued ahead of it, and keeps Twisted's order.

The socket is replaced by a recorder (``writeSomeData``) and the reactor registration by a flag
(``startWriting``): what is tested is which bytes go out now and which wait, in what order. The real
connection path is covered by every test that streams through daphne.
"""

from __future__ import annotations

import pytest
from twisted.internet import main, tcp

from tripod.patches.eager_writes import EagerServer, install


class Socket:
    """Takes up to ``room`` bytes per send, or fails every send with ``error``."""

    def __init__(self, room: int = 1 << 20, error: Exception | None = None) -> None:
        self.room, self.error, self.sent = room, error, b""

    def send(self, data) -> int | Exception:
        if self.error is not None:
            return self.error
        taken = bytes(data[: self.room])
        self.sent += taken
        return len(taken)


def connection(socket: Socket) -> EagerServer:
    conn = EagerServer.__new__(EagerServer)  # no real socket or reactor: only the write path is exercised
    conn.connected, conn.disconnecting, conn._writeDisconnected, conn.TLS = 1, False, False, False
    conn.producer, conn.dataBuffer, conn.offset, conn._tempDataBuffer, conn._tempDataLen = None, b"", 0, [], 0
    conn.writing = False
    conn.writeSomeData = socket.send
    conn.startWriting = lambda: setattr(conn, "writing", True)
    return conn


def queued(conn: EagerServer) -> bytes:
    return conn.dataBuffer[conn.offset :] + b"".join(conn._tempDataBuffer)


def test_a_write_with_nothing_queued_goes_out_at_once():
    socket = Socket()
    conn = connection(socket)
    conn.writeSequence([b"5\r\n", b"hello", b"\r\n"])
    conn.write(b"more")
    assert socket.sent == b"5\r\nhello\r\nmore"
    assert not conn.writing and queued(conn) == b""


def test_what_the_socket_does_not_take_waits_and_later_writes_queue_behind_it():
    socket = Socket(room=4)
    conn = connection(socket)
    conn.write(b"abcdefgh")
    assert socket.sent == b"abcd"
    assert conn.writing and queued(conn) == b"efgh"
    conn.writeSequence([b"ij", b"kl"])
    assert socket.sent == b"abcd", "nothing may overtake queued bytes"
    assert queued(conn) == b"efghijkl"


def test_a_failed_send_leaves_the_bytes_to_twisted_which_then_closes():
    conn = connection(Socket(error=main.CONNECTION_LOST))
    conn.write(b"frame")
    assert conn.writing and queued(conn) == b"frame"


@pytest.mark.parametrize("state", ["disconnecting", "_writeDisconnected"])
def test_closing_connections_keep_twisteds_path(state):
    socket = Socket()
    conn = connection(socket)
    setattr(conn, state, True)
    conn.write(b"frame")
    assert socket.sent == b""


def test_tls_connections_hand_the_bytes_to_the_tls_layer():
    socket = Socket()
    conn = connection(socket)
    conn.TLS = True
    conn.protocol = type("TLSLayer", (), {"write": lambda self, data: received.append(data)})()
    received = []
    conn.writeSequence([b"fra", b"me"])
    assert received == [b"frame"] and socket.sent == b""


def test_install_makes_tcp_ports_hand_out_eager_connections(monkeypatch):
    monkeypatch.setattr(tcp.Port, "transport", tcp.Server)
    install()
    assert tcp.Port.transport is EagerServer
