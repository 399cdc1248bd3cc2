"""The per-process fanout hub: one subscription per topic per process, one decode per message,
one encode per encoding, the same frame handed to every local subscriber at once.

DESIGN.md flow steps 5-6 give the shape; docs/realtime-contract.md is the API the edges (plain
socket, Phoenix, SSE) code against. Measured on this machine, handing one encoded frame to every
local socket's send directly delivered 12x the per-socket ``group_send`` of a Django Channels
layer, which is why there is no task or channel-layer hop per socket here.

Modes (the bus, chosen by settings: ``bus.py``):
- Redis (``REDIS_URL`` set): the router's after-commit publish (``hub.publish_committed``)
  PUBLISHes notification envelopes on ``<REDIS_PREFIX>:hub:<topic>``, one envelope (a JSON object)
  or a batch's consecutive envelopes of the topic (a JSON array of them) per payload
  (``wire.py``); every process holds one redis.asyncio pub/sub connection with one SUBSCRIBE per
  topic it has local subscribers for, and drops it with the last one (``bus_redis.py``).
- Embedded: the same payloads reach this process's hub through an in-process bus
  (``bus_memory.py``), handed over thread-safely.

Guarantee, per topic and process: subscribers get seqs contiguously and in order; gaps are filled
from the database once per process, and after a Redis outage the hub reconnects, resubscribes and
back-fills every subscribed topic by itself (``sequencer.py``). A joining subscriber's replay
meets the live stream without gap or duplicate (``replay.py``). Ephemeral topic events and named
channels cross the same bus (``broadcasts.py``). The registry and entries are in ``core.py``.
"""

from .core import Hub, get_hub, hub
from .messages import JSON_SEPARATORS, Batch, Message, encode_plain, websocket_text_frame
from .subscribers import HubUnavailable, Subscriber, SubscribeResult, Unsubscribed

__all__ = [
    "JSON_SEPARATORS",
    "Batch",
    "Hub",
    "HubUnavailable",
    "Message",
    "SubscribeResult",
    "Subscriber",
    "Unsubscribed",
    "encode_plain",
    "get_hub",
    "hub",
    "websocket_text_frame",
]
