"""What an operator sees: Prometheus metrics, structured logs, and what ``/readyz`` checks.

Each is read by something outside the server (Prometheus, a log collector, a load balancer's or Kubernetes' probe),
so their names and shapes are an interface too.
"""
