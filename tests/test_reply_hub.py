"""The web process's reply hub (llmworker/replies.py ReplyHub) on the real Redis: one pub/sub
connection, subscriptions written in batches, and every listener gets its conversation's
frames."""

import asyncio
import json
import uuid
from typing import Any, cast

import pytest
from redis.asyncio import Connection

from llmworker.redis import conversation_channel, redis_get
from llmworker.replies import ReplyHub, reply_hub_get

pytestmark = pytest.mark.asyncio


class Listener:
    """A socket as the hub sees it: the frames it was handed, in order."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def reply_frame_received(self, frame: dict[str, Any], raw: str) -> None:
        self.frames.put_nowait(frame)

    def reply_frames_maybe_missed(self) -> None:
        pass

    async def next_frame(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.frames.get(), 5)


async def _publish(conversation_id: str, text: str) -> None:
    frame = {"type": "delta", "seq": 1, "content": text}
    await redis_get().publish(conversation_channel(conversation_id), json.dumps(frame))


def _writes_counted(hub: ReplyHub, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What the hub writes on its pub/sub connection from now on, one item per write."""
    connection = cast(Connection, hub.pubsub.connection)
    writes: list[bytes] = []
    send = connection.send_packed_command

    async def counted(command: Any, check_health: bool = True) -> None:
        writes.append(command)
        await send(command, check_health=check_health)

    monkeypatch.setattr(connection, "send_packed_command", counted)
    return writes


async def _hub_connected() -> ReplyHub:
    hub = reply_hub_get()
    await hub.join(conversation_id=str(uuid.uuid4()), listener=Listener())
    return hub


async def test_it_subscribes_sockets_that_open_together_in_one_write(monkeypatch):
    hub = await _hub_connected()
    writes = _writes_counted(hub, monkeypatch)
    conversations = [str(uuid.uuid4()) for _ in range(50)]
    listeners = [Listener() for _ in conversations]

    await asyncio.gather(
        *(
            hub.join(conversation_id=conversation_id, listener=listener)
            for conversation_id, listener in zip(conversations, listeners, strict=True)
        )
    )
    for conversation_id in conversations:
        await _publish(conversation_id, f"for {conversation_id}")

    assert len(writes) == 1
    for conversation_id, listener in zip(conversations, listeners, strict=True):
        assert (await listener.next_frame())["content"] == f"for {conversation_id}"
        assert listener.frames.empty()  # and nothing of another conversation's


async def test_a_conversation_left_and_joined_in_one_go_still_gets_its_frames():
    hub = await _hub_connected()
    conversation_id = str(uuid.uuid4())
    leaving, joining = Listener(), Listener()
    await hub.join(conversation_id=conversation_id, listener=leaving)

    # The last socket leaves and another joins before the hub has written anything: the
    # unsubscribe and the subscribe go out in that order, in one write.
    await hub.leave(conversation_id=conversation_id, listener=leaving)
    await hub.join(conversation_id=conversation_id, listener=joining)
    await _publish(conversation_id, "still here")

    assert (await joining.next_frame())["content"] == "still here"
    assert leaving.frames.empty()


async def test_a_failed_subscription_is_written_again_for_the_next_socket(monkeypatch):
    hub = await _hub_connected()
    connection = cast(Connection, hub.pubsub.connection)
    send = connection.send_packed_command
    conversation_id = str(uuid.uuid4())
    first, second = Listener(), Listener()

    async def broken(command: Any, check_health: bool = True) -> None:
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(connection, "send_packed_command", broken)
    with pytest.raises(ConnectionError):
        await hub.join(conversation_id=conversation_id, listener=first)
    await hub.leave(conversation_id=conversation_id, listener=first)  # the refused socket
    monkeypatch.setattr(connection, "send_packed_command", send)
    await hub.join(conversation_id=conversation_id, listener=second)
    await _publish(conversation_id, "after the failure")

    assert (await second.next_frame())["content"] == "after the failure"
