"""What an operator sees: Prometheus metrics, structured logs, and what ``/readyz`` checks."""
