"""The light receive queue and writable flag of our uvicorn WebSocket protocol: the behaviour of
``asyncio.Queue`` and ``asyncio.Event`` that uvicorn relies on, with less held per socket."""

from __future__ import annotations

import asyncio

from notify_project.uvicorn_protocols import _Flag, _ReceiveQueue


async def test_the_receive_queue_hands_items_in_order_and_wakes_a_waiting_getter():
    queue = _ReceiveQueue()
    assert queue.empty() and queue.qsize() == 0
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    queue.put_nowait({"type": "websocket.connect"})
    queue.put_nowait({"type": "websocket.receive", "text": "a"})
    assert await asyncio.wait_for(getter, 1) == {"type": "websocket.connect"}
    assert queue.qsize() == 1
    assert await queue.get() == {"type": "websocket.receive", "text": "a"}
    assert queue.empty()


async def test_a_cancelled_getter_leaves_the_queue_working_for_the_next_one():
    queue = _ReceiveQueue()
    first, second = asyncio.ensure_future(queue.get()), asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    queue.put_nowait("x")
    assert await asyncio.wait_for(second, 1) == "x"
    assert first.cancelled()
    assert queue._waiters is None  # nothing kept for waiters that are gone


async def test_the_flag_waits_until_set_and_clears():
    flag = _Flag()
    assert not flag.is_set()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]
    assert await flag.wait() is True  # set: no wait
    flag.clear()
    late = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    assert not late.done()
    flag.set()
    assert await asyncio.wait_for(late, 1) is True


def test_the_served_protocol_takes_the_direct_write_path():
    """``manage.py serve``'s WebSocket protocol (our subclass) is recognised by the sender, so a
    batch of prebuilt frames leaves in one transport write instead of an ASGI send per frame."""
    from channels_app.sender import uvicorn_websocket
    from notify_project.uvicorn_protocols import WebSocketsProtocol

    proto = object.__new__(WebSocketsProtocol)
    for name in ("transport", "writable", "conn", "close_sent", "disconnected"):
        setattr(proto, name, None)
    assert uvicorn_websocket(proto.send) is proto
    assert uvicorn_websocket(object().__str__) is None
