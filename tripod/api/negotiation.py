"""Content negotiation for the API: OpenAI's endpoints ignore ``Accept``, and so do ours.

SSE clients send ``Accept: text/event-stream`` on every request, which DRF's default negotiation would refuse with a
406.
"""

from __future__ import annotations

from rest_framework.negotiation import DefaultContentNegotiation


class IgnoreAccept(DefaultContentNegotiation):
    """Answers with the view's first renderer (JSON) whatever ``Accept`` asks for.

    SSE clients (``httpx-sse``'s ``connect_sse``, ``@microsoft/fetch-event-source``, ``EventSource``) send
    ``Accept: text/event-stream`` on every request, and DRF would refuse it with a 406. A streamed reply is
    an SSE response that no renderer touches; the rest (a whole completion, a stream's description, an
    error) is JSON, as OpenAI answers them.
    """

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type
