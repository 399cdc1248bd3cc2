"""HTTP endpoints of the realtime edge (tokens, presence), mounted on the API in routing_app."""

from ninja import Router

router = Router(tags=["realtime"])
