"""Outbound delivery: email, SMS and webhook rows sent at least once through Celery.

- ``models``: Delivery, Attempt (one row per provider call) and BreakerState (a provider's
  breaker, mirrored for admin);
- ``transports/``: one module per channel kind behind one interface (``send -> Receipt``), over
  ``http`` (the pooled HTTP client), ``rendering`` (templates) and ``sms_text`` (segments);
- ``breaker`` (its state machine in ``breaker_circuit``, its Redis store in ``breaker_redis``):
  the rate-based circuit breaker per provider; ``transitions``: what a change of state does;
- ``balancer``: smooth weighted round-robin over the providers that may be called; ``limiter``:
  per channel and per provider, waiting, never dropping; ``health``: the providers' checks;
- ``service``: claim, guard, call, record, retry, fail over; ``dispatch``: handing ids to
  workers; ``sweeper``: the rows whose task was lost; ``receipts``: what providers report later;
- ``tasks``: the Celery edge; ``embedded``: the same loop in-process without Redis; ``api`` and
  ``admin``: the HTTP and admin edges.
"""
