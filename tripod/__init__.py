"""AI Tripod: serve Hugging Face language models from a Django Channels project."""
