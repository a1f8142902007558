"""The replay log on the real Redis: every frame of a reply once, in seq order, whatever the
publisher believes its next seq to be."""

import asyncio
import json
import uuid
from typing import Any

import pytest

from llmworker.redis import redis_get
from llmworker.replies import ReplyPublisher, StaleAttempt, reply_replay

pytestmark = [pytest.mark.asyncio]


def _publisher(job_id: str) -> ReplyPublisher:
    return ReplyPublisher(job_id=job_id, conversation_id=str(uuid.uuid4()), client=redis_get())


async def _logged(job_id: str) -> list[tuple[int, dict[str, Any]]]:
    return [(seq, json.loads(raw)) for seq, raw in await reply_replay(job_id=job_id, after=0)]


async def test_frames_are_numbered_from_one_in_order():
    job_id = str(uuid.uuid4())
    publisher = _publisher(job_id)
    await publisher.attempt_begin(1)

    seqs = [await publisher.delta(text) for text in ("a", "b", "c")]

    assert seqs == [1, 2, 3]
    assert [(seq, frame["seq"], frame["content"]) for seq, frame in await _logged(job_id)] == [
        (1, 1, "a"),
        (2, 2, "b"),
        (3, 3, "c"),
    ]


async def test_a_taken_seq_goes_after_the_last_frame_never_twice():
    job_id = str(uuid.uuid4())
    publisher = _publisher(job_id)
    await publisher.attempt_begin(1)
    await publisher.delta("a")
    await publisher.delta("b")

    publisher.next_seq = 1  # as if a send it thought lost had reached Redis after all
    seq = await publisher.delta("c")

    assert seq == 3
    assert [frame["seq"] for _, frame in await _logged(job_id)] == [1, 2, 3]


async def test_a_new_publisher_continues_the_log():
    job_id = str(uuid.uuid4())
    first = _publisher(job_id)
    await first.attempt_begin(1)
    await first.delta("a")

    # The worker's unfenced publisher of a final error (its entry lost, say) knows no seq.
    seq = await _publisher(job_id).error(code="llm_error", message="lost")

    assert seq == 2
    assert [frame["type"] for _, frame in await _logged(job_id)] == ["delta", "error"]


async def test_a_new_attempt_restarts_after_the_earlier_frames():
    job_id = str(uuid.uuid4())
    first = _publisher(job_id)
    await first.attempt_begin(1)
    await first.delta("a")

    second = _publisher(job_id)
    await second.attempt_begin(2)
    await second.delta("b")

    frames = [(seq, frame["type"]) for seq, frame in await _logged(job_id)]
    assert frames == [(1, "delta"), (2, "restart"), (3, "delta")]
    with pytest.raises(StaleAttempt):
        await first.delta("late")  # the superseded attempt writes nothing


async def test_frames_queued_while_the_attempt_begins_wait_for_its_fence_behind_the_restart():
    job_id = str(uuid.uuid4())
    first = _publisher(job_id)
    await first.attempt_begin(1)
    await first.delta("a")

    second = _publisher(job_id)
    begin = second.attempt_begin(2)
    second.delta_push("b")  # the provider's first token, before the attempt script answered
    await begin
    await second.deltas_flush()

    frames = [(seq, frame["type"], frame.get("content")) for seq, frame in await _logged(job_id)]
    assert frames == [(1, "delta", "a"), (2, "restart", None), (3, "delta", "b")]


async def test_the_first_delta_goes_alone_when_later_ones_queue_behind_it():
    job_id = str(uuid.uuid4())
    publisher = _publisher(job_id)
    begin = publisher.attempt_begin(1)
    for token in ("a", "b", "c"):  # the model's first tokens, before the fence is up
        publisher.delta_push(token)
    await begin
    await publisher.deltas_flush()

    frames = [(seq, frame.get("content")) for seq, frame in await _logged(job_id)]
    assert frames == [(1, "a"), (2, "bc")]


async def test_a_stale_attempt_sends_nothing_it_queued_while_it_began():
    job_id = str(uuid.uuid4())
    current = _publisher(job_id)
    await current.attempt_begin(2)
    await current.delta("a")

    stale = _publisher(job_id)
    begin = stale.attempt_begin(1)
    stale.delta_push("late")
    with pytest.raises(StaleAttempt):
        await begin
    with pytest.raises(StaleAttempt):
        await stale.deltas_flush()
    with pytest.raises(StaleAttempt):
        await asyncio.wait_for(stale.error(code="llm_error", message="late"), 10)

    assert [(seq, frame["content"]) for seq, frame in await _logged(job_id)] == [(1, "a")]


async def test_a_replay_starts_after_the_given_seq():
    job_id = str(uuid.uuid4())
    publisher = _publisher(job_id)
    await publisher.attempt_begin(1)
    for text in ("a", "b", "c", "d"):
        await publisher.delta(text)

    replayed = await reply_replay(job_id=job_id, after=2)

    assert [seq for seq, _ in replayed] == [3, 4]


async def test_the_running_log_expires_and_the_final_frame_sets_the_replay_expiry(settings):
    job_id = str(uuid.uuid4())
    publisher = _publisher(job_id)
    await publisher.attempt_begin(1)
    await publisher.delta("a")
    running = await redis_get().ttl(publisher.log_key)

    await publisher.done(reply_id="r", status="complete", content="a", usage=None)
    final = await redis_get().ttl(publisher.log_key)

    assert running > settings.LLM_REPLAY_TTL_SECONDS
    assert 0 < final <= settings.LLM_REPLAY_TTL_SECONDS


async def test_many_replies_streaming_at_once_each_keep_their_order():
    # Their frames share the process's round trips to Redis (FrameEmitter).
    job_ids = [str(uuid.uuid4()) for _ in range(20)]

    async def stream(job_id: str) -> list[int]:
        publisher = _publisher(job_id)
        await publisher.attempt_begin(1)
        return [await publisher.delta(f"{job_id}:{i}") for i in range(10)]

    seqs = await asyncio.gather(*(stream(job_id) for job_id in job_ids))

    assert seqs == [list(range(1, 11))] * 20
    for job_id in job_ids:
        contents = [frame["content"] for _, frame in await _logged(job_id)]
        assert contents == [f"{job_id}:{i}" for i in range(10)]


@pytest.mark.parametrize("spacing_ms", [5, 0])
async def test_a_busy_emitter_merges_each_replys_deltas_and_keeps_them_whole(settings, spacing_ms):
    # 100 replies pushing a delta every 5 ms keep the emitter busy: each reply's deltas go at
    # most every LLM_DELTA_WINDOW_MS (30), with rounds spaced or not (LLM_FRAME_BATCH_MS 0:
    # a round as soon as the one before is answered, and none while every reply waits).
    settings.LLM_FRAME_BATCH_MS = spacing_ms
    job_ids = [str(uuid.uuid4()) for _ in range(100)]
    pushed = [f" {i}" for i in range(50)]

    async def stream(job_id: str) -> None:
        publisher = _publisher(job_id)
        await publisher.attempt_begin(1)
        await publisher.delta("first")
        for text in pushed:
            await asyncio.sleep(0.005)  # the provider's pace
            publisher.delta_push(text)
        await publisher.deltas_flush()

    await asyncio.gather(*(stream(job_id) for job_id in job_ids))

    frames_sent = 0
    for job_id in job_ids:
        logged = await _logged(job_id)
        assert [seq for seq, _ in logged] == list(range(1, len(logged) + 1))
        assert logged[0][1]["content"] == "first"
        assert "".join(frame["content"] for _, frame in logged[1:]) == "".join(pushed)
        frames_sent += len(logged)
    assert frames_sent < len(job_ids) * (len(pushed) + 1) / 3
