"""The worker reads a provider's event stream itself (llmworker/providers.py): whatever way
the server cuts its body into writes and ends its lines, the reply comes out whole and in
order, through the real openai client, from a server on a loopback port."""

import asyncio
import json
from collections.abc import Callable

import pytest

from llmworker.providers import OpenAIProvider, ProviderError

pytestmark = pytest.mark.asyncio

TOKENS = ["Héllo", " wörld", ", I", " am", " here", ".\n\nBye"]


def _event(payload: dict[str, object]) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False)


def _events(line_end: str) -> bytes:
    lines = [": keep-alive comment", ""]
    for token in TOKENS:
        lines += [_event({"choices": [{"index": 0, "delta": {"content": token}}]}), ""]
    usage = {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    lines += [_event({"choices": [], "usage": usage}), "", "data: [DONE]", ""]
    return (line_end.join(lines) + line_end).encode()


async def _serve(body_writes: list[bytes]) -> tuple[asyncio.Server, str]:
    """An HTTP server answering one streamed chat request with `body_writes`, each its own
    chunk of the chunked body, flushed apart."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for data in body_writes:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(0.002)  # separate reads on the client's side, most of the time
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


async def _read(body_writes: list[bytes]) -> tuple[str, dict[str, int] | None]:
    server, base_url = await _serve(body_writes)
    provider = OpenAIProvider(api_key="test", base_url=base_url, timeout=10)
    texts: list[str] = []
    usage: dict[str, int] | None = None
    try:
        prompt = [{"role": "user", "content": "Hi"}]
        async for chunk in provider.stream(messages=prompt, model="m"):
            texts.append(chunk.text)
            usage = chunk.usage or usage
    finally:
        await provider.aclose()
        server.close()
    return "".join(texts), usage


def _cut_every(size: int) -> Callable[[bytes], list[bytes]]:
    return lambda body: [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("line_end", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize(
    "cut", [lambda body: [body], _cut_every(3), _cut_every(7), _cut_every(64)],
    ids=["whole", "3 bytes", "7 bytes", "64 bytes"],
)  # fmt: skip
async def test_it_reads_the_whole_reply_however_the_stream_is_cut(line_end, cut):
    text, usage = await _read(cut(_events(line_end)))

    assert text == "".join(TOKENS)
    assert usage == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


async def test_it_reads_a_last_event_without_its_line_end():
    body = _events("\n").removesuffix(b"data: [DONE]\n\n")
    body += _event({"choices": [{"index": 0, "delta": {"content": "!"}}]}).encode()

    text, _ = await _read([body])

    assert text == "".join(TOKENS) + "!"


async def test_it_fails_the_reply_on_an_event_that_is_not_json():
    body = _events("\n").replace(b'"content": " am"', b'"content": " am', 1)

    with pytest.raises(ProviderError) as raised:
        await _read([body])

    assert raised.value.kind == "malformed"
    assert raised.value.retryable
