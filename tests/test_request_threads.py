"""ReusedRequestThreads: each HTTP request's thread-sensitive code on one thread, reused, never shared while running."""

from __future__ import annotations

import asyncio
import threading

from asgiref.sync import sync_to_async

from tripod.patches.request_threads import ReusedRequestThreads, outlive_request


def run_requests(app, count: int, *, concurrently: bool) -> list[list[int]]:
    """Each request's thread idents, from two thread-sensitive calls with a pause between them."""

    async def one() -> list[int]:
        seen: list[int] = []

        async def inner(scope, receive, send):
            seen.append(await sync_to_async(threading.get_ident)())
            await asyncio.sleep(0.01)
            seen.append(await sync_to_async(threading.get_ident)())

        app.app = inner
        await app({"type": "http"}, None, None)
        return seen

    async def main():
        if concurrently:
            return await asyncio.gather(*(one() for _ in range(count)))
        return [await one() for _ in range(count)]

    return asyncio.run(main())


def test_a_request_keeps_one_thread_and_later_requests_reuse_it():
    app = ReusedRequestThreads(None)
    idents = run_requests(app, 3, concurrently=False)
    assert all(a == b for a, b in idents)
    assert len({a for a, _ in idents}) == 1 and idents[0][0] != threading.get_ident()


def test_requests_running_at_once_never_share_a_thread():
    app = ReusedRequestThreads(None)
    idents = run_requests(app, 4, concurrently=True)
    assert all(a == b for a, b in idents)
    assert len({a for a, _ in idents}) == 4


def test_idle_threads_beyond_keep_idle_are_let_go():
    app = ReusedRequestThreads(None, keep_idle=2)
    run_requests(app, 4, concurrently=True)
    assert len(app._idle) == 2


def test_a_task_that_outlives_its_request_can_still_call_sync_code():
    app = ReusedRequestThreads(None)
    results = []

    async def work():
        await asyncio.sleep(0.02)  # the request has ended by now
        results.append(await sync_to_async(threading.get_ident)())

    async def inner(scope, receive, send):
        outlive_request(work(), "req-1")

    async def main():
        app.app = inner
        await app({"type": "http"}, None, None)
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert len(results) == 1
