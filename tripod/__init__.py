"""AI Tripod: serve Hugging Face language models from a Django Channels project.

This package is the Django project itself (settings, URLs, models, the REST API, the engines, the training leg);
``consumers/`` and ``asgi_worker/`` beside it are the two ends of a generation job.
"""
