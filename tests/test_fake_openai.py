"""Tests of the fake OpenAI server, driven through the real ``openai`` client."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.fake_openai import MODEL_ID, Behaviour, FakeOpenAI

REPO_ROOT = Path(__file__).resolve().parent.parent
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello please"},
]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def make_client(fake: FakeOpenAI, timeout: float = 10.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="test", base_url=fake.base_url, max_retries=0, timeout=timeout
    )


async def open_stream(
    client: openai.AsyncOpenAI, **kwargs: Any
) -> openai.AsyncStream[openai.types.chat.ChatCompletionChunk]:
    stream: openai.AsyncStream[openai.types.chat.ChatCompletionChunk]
    stream = await client.chat.completions.create(
        model="gpt-test", messages=MESSAGES, stream=True, **kwargs
    )
    return stream


def content_of(chunk: openai.types.chat.ChatCompletionChunk) -> str:
    return (chunk.choices[0].delta.content or "") if chunk.choices else ""


async def collect_text(client: openai.AsyncOpenAI) -> str:
    stream = await open_stream(client)
    return "".join([content_of(chunk) async for chunk in stream])


async def wait_for_disconnect(fake: FakeOpenAI) -> float:
    # In a thread, so that this test's event loop keeps serving the client meanwhile.
    return await asyncio.to_thread(fake.wait_for_disconnect, 5.0)


# ---------------------------------------------------------------------- happy path


@pytest.mark.asyncio
async def test_streams_the_default_reply_token_by_token_then_usage(fake: FakeOpenAI) -> None:
    async with make_client(fake) as client:
        stream = await open_stream(client, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]

    tokens = [content_of(chunk) for chunk in chunks if content_of(chunk)]
    assert tokens == ["Hello", " from", " the", " fake", " model."]
    assert "".join(tokens) == Behaviour().reply
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert {(c.id, c.model, c.object) for c in chunks} == {
        ("chatcmpl-fake-1", "gpt-test", "chat.completion.chunk")
    }
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (5, 5, 10)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("behaviour", "options"),
    [
        (Behaviour(), None),
        (Behaviour(usage=False), {"include_usage": True}),
    ],
    ids=["not-requested", "disabled"],
)
async def test_no_usage_chunk_unless_requested_and_enabled(
    fake: FakeOpenAI, behaviour: Behaviour, options: dict[str, bool] | None
) -> None:
    fake.default = behaviour
    extra = {} if options is None else {"stream_options": options}
    async with make_client(fake) as client:
        chunks = [chunk async for chunk in await open_stream(client, **extra)]

    assert all(chunk.usage is None and chunk.choices for chunk in chunks)


@pytest.mark.asyncio
async def test_explicit_tokens_and_non_streamed_completion(fake: FakeOpenAI) -> None:
    fake.default = Behaviour(tokens=["A", "B", "C"])
    async with make_client(fake) as client:
        completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "ABC"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 3)


@pytest.mark.asyncio
async def test_records_the_requests_model_and_messages(fake: FakeOpenAI) -> None:
    async with make_client(fake) as client:
        await collect_text(client)

    [body] = fake.wait_for_requests(1)
    assert body["model"] == "gpt-test"
    assert body["messages"] == MESSAGES
    assert body["stream"] is True


@pytest.mark.asyncio
async def test_scripted_behaviours_are_used_in_order_then_the_default(fake: FakeOpenAI) -> None:
    fake.enqueue(Behaviour(reply="first"), Behaviour(reply="second"))
    async with make_client(fake) as client:
        replies = [await collect_text(client) for _ in range(3)]

    assert replies == ["first", "second", Behaviour().reply]


def test_wait_for_requests_times_out_and_reset_forgets(fake: FakeOpenAI) -> None:
    with pytest.raises(TimeoutError):
        fake.wait_for_requests(1, timeout=0.05)

    fake.enqueue(Behaviour(reply="scripted"))
    fake.reset()

    assert fake.requests == []
    assert fake.disconnects == []
    with pytest.raises(TimeoutError):
        fake.wait_for_disconnect(timeout=0.05)


@pytest.mark.asyncio
async def test_reset_drops_the_script(fake: FakeOpenAI) -> None:
    fake.enqueue(Behaviour(reply="scripted"))
    fake.reset()
    async with make_client(fake) as client:
        assert await collect_text(client) == Behaviour().reply


@pytest.mark.asyncio
async def test_reset_forgets_a_stream_still_running(fake: FakeOpenAI) -> None:
    fake.enqueue(Behaviour(tokens=[" a", " b"], hold_after=1))
    async with make_client(fake) as client:
        stream = await open_stream(client)
        chunks = aiter(stream)
        while content_of(await anext(chunks)) != " a":
            pass
        active_before = fake.active_streams
        await asyncio.to_thread(fake.reset)  # also lets the held stream go on
        active_after = fake.active_streams
        rest = "".join([content_of(chunk) async for chunk in chunks])

    assert (active_before, active_after, rest) == (1, 0, " b")
    # Its end is not subtracted from the next test's count.
    assert fake.active_streams == 0


@pytest.mark.asyncio
async def test_hold_after_waits_for_release(fake: FakeOpenAI) -> None:
    fake.enqueue(Behaviour(tokens=[" a", " b", " c"], hold_after=1))
    async with make_client(fake) as client:
        stream = await open_stream(client)
        chunks = aiter(stream)
        while content_of(await anext(chunks)) != " a":
            pass
        # A whole other answer comes and goes meanwhile; the held one stays open.
        other = await collect_text(client)
        await asyncio.to_thread(fake.wait_for_active_streams, 1)  # only the held one is left
        await asyncio.to_thread(fake.release)
        rest = "".join([content_of(chunk) async for chunk in chunks])

    assert (other, rest) == (Behaviour().reply, " b c")


@pytest.mark.asyncio
async def test_arrivals_are_taken_by_the_server(fake: FakeOpenAI) -> None:
    async with make_client(fake) as client:
        sent_at = time.monotonic()
        await collect_text(client)
        between = time.monotonic()
        await collect_text(client)
        answered_at = time.monotonic()

    first, second = fake.arrivals
    assert sent_at <= first <= between <= second <= answered_at
    fake.reset()
    assert fake.arrivals == []


@pytest.mark.asyncio
async def test_lists_the_fake_model(fake: FakeOpenAI) -> None:
    async with make_client(fake) as client:
        models = await client.models.list()

    assert [model.id for model in models.data] == [MODEL_ID]


@pytest.mark.asyncio
async def test_unknown_path_is_a_404_json_error(fake: FakeOpenAI) -> None:
    async with make_client(fake) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.get("/nowhere", cast_to=object)

    assert caught.value.body == {
        "message": "Invalid URL (GET /v1/nowhere)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hang_after": 1, "cut_after": 1}, "mutually exclusive"),
        ({"interval": -1.0}, "interval"),
        ({"status": 99}, "status"),
    ],
)
def test_behaviour_rejects_nonsense(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Behaviour(**kwargs)


# ---------------------------------------------------------------------- injected errors


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "error"),
    [(500, openai.InternalServerError), (400, openai.BadRequestError)],
)
async def test_error_status_raises_the_matching_openai_error(
    fake: FakeOpenAI, status: int, error: type[openai.APIStatusError]
) -> None:
    fake.enqueue(Behaviour(status=status, error_message="boom"))
    async with make_client(fake) as client:
        with pytest.raises(error) as caught:
            await open_stream(client)

    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"] == "boom"


@pytest.mark.asyncio
async def test_rate_limit_carries_retry_after(fake: FakeOpenAI) -> None:
    fake.enqueue(Behaviour(status=429, retry_after=2))
    async with make_client(fake) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await open_stream(client)

    assert caught.value.response.headers["Retry-After"] == "2"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "rate_limit_exceeded"


# ---------------------------------------------------------------------- broken streams


@pytest.mark.asyncio
async def test_cut_after_breaks_the_stream_after_exactly_n_tokens(fake: FakeOpenAI) -> None:
    fake.enqueue(Behaviour(tokens=[" a", " b", " c", " d"], cut_after=2))
    received: list[str] = []
    async with make_client(fake) as client:
        stream = await open_stream(client)
        # The client reports a truncated chunked body as a connection error.
        with pytest.raises(openai.APIConnectionError):
            async for chunk in stream:
                received.append(content_of(chunk))

    assert [token for token in received if token] == [" a", " b"]
    assert fake.disconnects == []  # the server hung up, not the client


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_hang_times_out_the_client_and_records_its_disconnect(
    fake: FakeOpenAI, stream: bool
) -> None:
    fake.enqueue(Behaviour(hang=True))
    async with make_client(fake, timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=stream)

        await wait_for_disconnect(fake)
    assert fake.active_streams == 0


@pytest.mark.asyncio
async def test_closing_the_stream_early_is_seen_as_a_disconnect(fake: FakeOpenAI) -> None:
    fake.enqueue(Behaviour(tokens=[f" t{i}" for i in range(20)], interval=0.2))
    received: list[str] = []
    closed_at: float | None = None
    async with make_client(fake) as client:
        stream = await open_stream(client)
        async for chunk in stream:
            if content_of(chunk):
                received.append(content_of(chunk))
            if len(received) == 2:
                closed_at = time.monotonic()
                await stream.close()
                break

        seen_at = await wait_for_disconnect(fake)
    assert received == [" t0", " t1"]
    assert closed_at is not None
    assert 0 <= seen_at - closed_at < 1.0
    assert fake.active_streams == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour(tokens=[" a", " b", " c"], interval=30.0),
        Behaviour(tokens=[" a", " b", " c"], hang_after=1),
    ],
    ids=["sleeping-between-tokens", "stalled"],
)
async def test_disconnect_is_noticed_without_waiting_for_the_next_token(
    fake: FakeOpenAI, behaviour: Behaviour
) -> None:
    fake.enqueue(behaviour)
    async with make_client(fake) as client:
        stream = await open_stream(client)
        async for chunk in stream:
            if content_of(chunk) == " a":
                break
        closed_at = time.monotonic()
        await stream.close()

        # Far below the 30 s interval: only a watch on the socket can be this quick.
        seen_at = await wait_for_disconnect(fake)
    assert seen_at - closed_at < 0.5


# ---------------------------------------------------------------------- connections


@pytest.mark.asyncio
async def test_two_concurrent_streams_both_complete(fake: FakeOpenAI) -> None:
    fake.default = Behaviour(tokens=[" x", " y", " z"], interval=0.01)
    both_started = asyncio.Barrier(2)

    async def consume(client: openai.AsyncOpenAI) -> str:
        stream = await open_stream(client)
        text = ""
        async for chunk in stream:
            text += content_of(chunk)
            if text == " x":
                # Neither stream proceeds until both got a token: a server that served
                # one connection at a time would deadlock here and time out.
                await both_started.wait()
        return text

    async with make_client(fake) as client:
        results = await asyncio.wait_for(asyncio.gather(consume(client), consume(client)), 5)

    assert list(results) == [" x y z", " x y z"]  # typeshed says a tuple
    assert fake.connection_count == 2


@pytest.mark.asyncio
async def test_sequential_requests_reuse_one_keep_alive_connection(fake: FakeOpenAI) -> None:
    fake.enqueue(Behaviour(), Behaviour(status=400), Behaviour())
    async with make_client(fake) as client:
        first = await collect_text(client)
        with pytest.raises(openai.BadRequestError):
            await open_stream(client)
        whole = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        second = await collect_text(client)

    assert first == second == whole.choices[0].message.content == Behaviour().reply
    assert fake.connection_count == 1


@pytest.mark.asyncio
async def test_stop_with_open_connections_is_quiet_and_prompt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = FakeOpenAI(Behaviour(hang=True)).start()
    async with make_client(server) as client:
        hanging = asyncio.create_task(open_stream(client))
        await asyncio.to_thread(server.wait_for_requests, 1)
        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            await asyncio.wait_for(asyncio.to_thread(server.stop), 5)

        with pytest.raises(openai.APIConnectionError):
            await hanging
    assert [r for r in caplog.records if r.name == "asyncio"] == []
    assert server.active_streams == 0


# ---------------------------------------------------------------------- standalone process


@pytest.mark.asyncio
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_standalone_process_serves_until_signalled(signum: signal.Signals) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.fake_openai",
        "--port",
        "0",
        "--tokens",
        "3",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert line.startswith("listening on http://127.0.0.1:")
        base_url = line.removeprefix("listening on ").strip()
        async with openai.AsyncOpenAI(api_key="test", base_url=base_url, max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="gpt-test", messages=MESSAGES, stream=True
            )
            text = "".join([content_of(chunk) async for chunk in stream])
            # Signalled while the client still holds its idle keep-alive connection.
            process.send_signal(signum)
            _, stderr = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert text == " tok0 tok1 tok2"
    assert process.returncode == 0
    assert stderr == b""
