"""New realtime connections (WebSocket upgrades, SSE streams) per client address, per process.

A token bucket per address: ``CONNECTS_PER_S`` refill, ``CONNECT_BURST`` at once. Over it, the
connection is refused before any work is done for it (no token check, no database, no hub):
an SSE request gets 429 with Retry-After, a WebSocket upgrade the same 429 as its HTTP answer
(the ASGI ``websocket.http.response`` extension; a server without it refuses the upgrade with its
own 403).

Accepted limits, written down:
- per process: with N processes behind a balancer an address may open up to N times as many;
- the address is the ASGI scope's client, which uvicorn takes from X-Forwarded-For when the
  connection comes from ``--forwarded-allow-ips`` (127.0.0.1 by default): the proxy must set it
  (docs/deployment.md), else every client shares the proxy's address;
- loopback addresses are not limited: local tools, benchmarks and a proxy that forwards no
  address. A proxy on this machine must therefore send X-Forwarded-For.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time

# A browser page opens one or two realtime connections and reconnects with backoff; an office
# behind one NAT reconnecting after a server restart is a burst of a few hundred.
CONNECTS_PER_S = 20.0
CONNECT_BURST = 300.0
MAX_TRACKED_ADDRESSES = 100_000  # past this, addresses with a full bucket are forgotten
SSE_PREFIX = "/events/"


class ConnectBuckets:
    """One token bucket per address (monotonic clock; one event loop, so no lock)."""

    def __init__(self, rate_per_s: float = CONNECTS_PER_S, burst: float = CONNECT_BURST) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def take(self, address: str) -> float:
        """0.0 when ``address`` may connect now (and count it), else the seconds until it may."""
        now = time.monotonic()
        tokens, at = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s
        if len(self._buckets) >= MAX_TRACKED_ADDRESSES:
            self._forget_idle(now)
        self._buckets[address] = (tokens - 1.0, now)
        return 0.0

    def _forget_idle(self, now: float) -> None:
        full = [
            a
            for a, (t, at) in self._buckets.items()
            if t + (now - at) * self.rate_per_s >= self.burst
        ]
        for address in full:
            del self._buckets[address]
        if len(self._buckets) >= MAX_TRACKED_ADDRESSES:
            self._buckets.clear()  # bounded memory over precision under an address flood


def _limited_address(scope: dict) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    try:
        if ipaddress.ip_address(client[0]).is_loopback:
            return None
    except ValueError:
        pass  # not an IP (a unix socket path): limit it by its name
    return client[0]


def limit_connects(app, buckets: ConnectBuckets | None = None):
    """ASGI middleware: WebSocket connections and SSE requests to ``app`` over their address's
    rate are refused with 429 and Retry-After (module docstring); everything else passes."""
    buckets = buckets or ConnectBuckets()

    async def limited(scope: dict, receive, send) -> None:
        kind = scope["type"]
        guarded = kind == "websocket" or (
            kind == "http" and scope["path"].startswith(SSE_PREFIX) and scope["method"] == "GET"
        )
        address = _limited_address(scope) if guarded else None
        wait_s = buckets.take(address) if address else 0.0
        if not wait_s:
            return await app(scope, receive, send)
        retry_after = str(max(1, math.ceil(wait_s)))
        detail = (
            f"too many new connections from {address}: at most {CONNECTS_PER_S:g} per second; "
            f"retry after {retry_after} s"
        )
        if kind == "http":
            await _answer_429(send, "http.response", retry_after, detail)
        elif "websocket.http.response" in scope.get("extensions", {}):
            if (await receive())["type"] == "websocket.connect":
                await _answer_429(send, "websocket.http.response", retry_after, detail)
        elif (await receive())["type"] == "websocket.connect":
            await send({"type": "websocket.close"})

    return limited


async def _answer_429(send, prefix: str, retry_after: str, detail: str) -> None:
    body = json.dumps({"detail": detail, "errors": []}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", retry_after.encode()),
    ]
    await send({"type": f"{prefix}.start", "status": 429, "headers": headers})
    await send({"type": f"{prefix}.body", "body": body, "more_body": False})
