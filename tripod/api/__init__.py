"""The OpenAI-compatible REST API (Django REST framework)."""
