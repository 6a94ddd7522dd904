"""A WebSocket chat client for AI Tripod: prints the reply as it streams.

    python examples/ws_client.py "Tell me about rivers" --url ws://127.0.0.1:8000/ws/chat/

Needs only the ``websockets`` package. The protocol is described in docs/websocket.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import websockets


async def chat(url: str, prompt: str, max_tokens: int, temperature: float) -> int:
    async with websockets.connect(url) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "chat",
                    "id": "1",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                }
            )
        )
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "delta":
                print(frame["text"], end="", flush=True)
            elif frame["type"] == "done":
                print(f"\n[finish_reason={frame['finish_reason']} usage={json.dumps(frame['usage'])}]")
                return 0
            elif frame["type"] == "error":
                print(f"\n[error] {frame['error']['message']}", file=sys.stderr)
                return 1
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws/chat/")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    return asyncio.run(chat(args.url, args.prompt, args.max_tokens, args.temperature))


if __name__ == "__main__":
    sys.exit(main())
