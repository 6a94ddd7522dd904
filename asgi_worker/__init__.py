"""The GPU worker: pulls generation jobs from the channel layer, drives an engine, sends events back."""
