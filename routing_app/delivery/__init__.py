"""Outbound delivery: email, SMS and webhook rows sent at least once through Celery.

- ``models``: Delivery, Attempt (one row per provider call) and BreakerState (a provider's breaker,
  mirrored for admin);
- ``transports/``: one module per channel kind behind one interface (``send -> Receipt``);
- ``breaker``: the rate-based circuit breaker per provider; ``balancer``: smooth weighted
  round-robin over the providers that may be called; ``limiter``: per channel and per provider,
  waiting, never dropping;
- ``service``: claim, guard, call, record, retry, fail over; ``sweeper``: the rows whose task was
  lost; ``tasks``: the Celery edge; ``embedded``: the same loop in-process without Redis.
"""
