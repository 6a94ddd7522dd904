"""A TCP relay between a browser and a test server, to break the network the way a phone does.

``cut()`` drops every live connection at once while the relay keeps listening, so clients can reconnect.
``hold_stream(after_bytes)`` makes the next ``GET /v1/streams/…`` response stop after that many bytes (it
may stop mid-frame) until the cut, so that a test acts mid-stream however fast the model is. Every byte
clients send is kept, so a test can read the requests they made (``requests()``).
"""

from __future__ import annotations

import re
import socket
import threading

REQUEST = re.compile(rb"(GET|POST|DELETE|PUT|PATCH|HEAD|OPTIONS) (\S+) HTTP/1\.1\r\n(.*?)\r\n\r\n", re.S)


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.sent = bytearray()  # client → server
        self.stream_response_bytes: int | None = None  # counted from the GET /v1/streams/ request on

    def shut(self) -> None:
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class TCPProxy:
    """Listens on a free local port and relays each connection to ``upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self.cuts = 0
        self.held = threading.Event()  # set once a held stream has reached its byte limit
        self._lock = threading.Lock()
        self._live: set[_Connection] = set()
        self._all: list[_Connection] = []
        self._hold_after: int | None = None
        self._held_connection: _Connection | None = None
        self._release = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def hold_stream(self, after_bytes: int) -> None:
        """Let the next stream response through for ``after_bytes`` bytes, then hold the rest until ``cut()``."""
        with self._lock:
            self._hold_after = after_bytes
            self._held_connection = None
            self.held.clear()
            self._release.clear()

    def cut(self) -> None:
        """Drop every live connection (held bytes are lost with it); new connections are relayed as before."""
        with self._lock:
            live = list(self._live)
            self._hold_after = None
            self._held_connection = None
            self.cuts += 1
        for connection in live:
            connection.shut()
        self._release.set()

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """``(method, target, headers)`` of every request clients sent, in order per connection."""
        with self._lock:
            sent = [bytes(connection.sent) for connection in self._all]
        found = []
        for raw in sent:
            for match in REQUEST.finditer(raw):
                headers = {}
                for line in match.group(3).split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
                found.append((match.group(1).decode(), match.group(2).decode("latin-1"), headers))
        return found

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            connection = _Connection(client, upstream)
            with self._lock:
                self.accepted += 1
                self._live.add(connection)
                self._all.append(connection)
            threading.Thread(target=self._run, args=(connection,), daemon=True).start()

    def _run(self, connection: _Connection) -> None:
        upload = threading.Thread(target=self._upload, args=(connection,), daemon=True)
        upload.start()
        self._download(connection)
        upload.join()
        with self._lock:
            self._live.discard(connection)
        connection.client.close()
        connection.upstream.close()

    def _upload(self, connection: _Connection) -> None:
        try:
            while data := connection.client.recv(65536):
                with self._lock:
                    connection.sent += data
                    if (
                        self._hold_after is not None
                        and self._held_connection is None
                        and re.search(rb"GET /v1/streams/\S+ HTTP/1\.1\r\n", data)
                    ):
                        self._held_connection = connection
                        connection.stream_response_bytes = 0
                connection.upstream.sendall(data)
        except OSError:
            pass
        connection.shut()

    def _download(self, connection: _Connection) -> None:
        try:
            while data := connection.upstream.recv(65536):
                with self._lock:
                    limit = self._hold_after if self._held_connection is connection else None
                    if limit is not None:
                        room = max(limit - connection.stream_response_bytes, 0)
                        data, rest = data[:room], data[room:]
                        connection.stream_response_bytes += len(data)
                if data:
                    connection.client.sendall(data)
                if limit is not None and rest:
                    self.held.set()
                    self._release.wait()
                    return  # cut: what was held is dropped with the connection
        except OSError:
            pass
        connection.shut()
