"""No secret in any log line, at any level: keys and stream tokens sent where they are refused, against a real
daphne logging at DEBUG (its whole stderr and stdout are the captured log)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.conftest import chat_body
from tests.processes import LiveServer, create_key, manage


@pytest.fixture(scope="module")
def debug_server():
    with LiveServer({"TRIPOD_LOG_LEVEL": "DEBUG", "TRIPOD_AUTH_CACHE_SECONDS": "0"}) as server:
        keys = {name: create_key(server.db_path, name) for name in ("good", "revoked", "in-query")}
        assert manage(server.db_path, "tripod_keys", "revoke", "revoked").returncode == 0
        yield server.wait_ready(), keys


def test_no_key_or_stream_token_in_any_log_line(debug_server):
    server, keys = debug_server
    wrong = "tpd_wrong-key-that-must-not-be-logged-000000000000000"
    good = {"Authorization": f"Bearer {keys['good']}"}
    secrets = [keys["good"], keys["revoked"], keys["in-query"], wrong]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # A key in the query string (refused: keys go in the Authorization header), on several routes and names.
        for name in ("api_key", "key", "token", "access_token"):
            client.get(f"/v1/models?{name}={keys['in-query']}")
            client.post(f"/v1/chat/completions?{name}={keys['in-query']}", json=chat_body(max_tokens=1))
        client.get(f"/v1/models?api_key={keys['in-query']}", headers=good)
        client.get(f"/no/such/page?api_key={keys['in-query']}")
        # Wrong and revoked keys in the header.
        for key in (wrong, keys["revoked"]):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
            client.post(
                "/v1/chat/completions", json=chat_body(max_tokens=1), headers={"Authorization": f"Bearer {key}"}
            )
        # Stream reads: a bad token, and valid tokens that are refused (another stream's, a bad Last-Event-ID).
        created = client.post("/v1/streams", json=chat_body(max_tokens=2), headers=good)
        assert created.status_code == 201, created.text
        other = client.post("/v1/streams", json=chat_body(max_tokens=2), headers=good).json()
        stream, token = created.json(), created.json()["url"].split("token=")[1]
        other_token = other["url"].split("token=")[1]
        secrets += [token, other_token]
        assert client.get(f"/v1/streams/{stream['id']}?token=garbage{token[:12]}").status_code == 403
        assert client.get(f"/v1/streams/{stream['id']}?token={other_token}").status_code == 403
        assert client.delete(f"/v1/streams/{stream['id']}?token={other_token}").status_code == 403
        refused = client.get(stream["url"], headers={"Last-Event-ID": "x"})
        assert refused.status_code == 400
        assert client.get(f"/v1/streams/strm_gone?token={token}").status_code == 403
        assert client.get(stream["url"]).status_code == 200
    # WebSockets: the key in the query string, and wrong and revoked keys as subprotocols.
    for url, protocols in (
        (f"/ws/chat/?api_key={keys['in-query']}", None),
        ("/ws/chat/", ["tripod", f"bearer.{wrong}"]),
        ("/ws/chat/", ["tripod", f"bearer.{keys['revoked']}"]),
    ):
        try:
            asyncio.run(_ws_once(server.ws_url + url, protocols))
        except InvalidStatus:
            pass
    log = server.output()
    assert '"level": "DEBUG"' in log, "the server logged at debug level"
    assert '"level": "WARNING"' in log, "refusals were logged"
    for secret in secrets:
        assert secret not in log, [line for line in log.splitlines() if secret in line][:3]
        assert secret[:24] not in log, "a prefix long enough to matter"


async def _ws_once(url: str, subprotocols: list[str] | None) -> None:
    async with websockets.connect(url, subprotocols=subprotocols) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "a", **chat_body(max_tokens=1)}))
        await ws.recv()


def test_the_log_filter_redacts_every_part_of_a_record():
    """What the server's console handler does to any logger's record (daphne's runserver logs the whole URI)."""
    import logging
    import sys

    from tripod.observability.logs import JsonFormatter, RequestIDFilter

    key = "tpd_Zx9-secret-secret-secret-secret-secret-00"
    try:
        raise ValueError(f"lookup failed for {key}")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "django.channels.server",
        logging.WARNING,
        __file__,
        1,
        "HTTP %s %s %s",
        ("GET", f"/v1/x?api_key={key}", 401),
        exc_info,
    )
    record.headers = f"Authorization: Bearer sk-env-{key[4:]}"
    record.prompt = [{"role": "user", "content": f"my key is {key}"}]
    assert RequestIDFilter().filter(record)
    line = JsonFormatter().format(record)
    assert key[4:] not in line and "[redacted]" in line
    # A structured field keeps its structure: the logged prompt is still a list of messages.
    assert json.loads(line)["prompt"] == [{"role": "user", "content": "my key is tpd_[redacted]"}]
    assert "HTTP GET /v1/x?api_key=[redacted] 401" in line
