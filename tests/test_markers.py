"""The ``slow`` marker: tests that start processes get it from tests/conftest.py, so ``-m "not slow"`` skips them."""

from __future__ import annotations

from tests.conftest import _starts_processes
from tests.processes import LiveServer, RedisServer


def _starts_a_server():
    return LiveServer({})


def _calls_a_helper_that_starts_one():
    return [_starts_a_server() for _ in range(1)]


def _pure():
    return sorted({3, 1, 2})


class _Stack:
    def start(self):
        self.redis = RedisServer()


def test_code_that_starts_a_process_is_found_through_helpers_and_classes():
    assert _starts_processes(_starts_a_server, set())
    assert _starts_processes(_calls_a_helper_that_starts_one, set())
    assert _starts_processes(_Stack, set())
    assert not _starts_processes(_pure, set())


def test_a_test_that_starts_nothing_is_not_slow(request):
    assert request.node.get_closest_marker("slow") is None


def test_a_test_with_a_redis_fixture_is_slow(redis_server, request):
    assert request.node.get_closest_marker("slow") is not None
