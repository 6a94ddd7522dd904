"""The OpenAI-compatible REST API (Django REST framework).

DRF runs the request cycle (authentication, throttles, errors, the OpenAPI schema); the modules here hold the views
and the few places where OpenAI's behaviour differs from DRF's defaults: parsing, rendering, content negotiation and
the shape of errors.
"""
