"""LLM providers: where the tokens come from.

`OpenAIProvider` speaks to any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp);
`DemoProvider` streams a canned reply so the service runs without an account.
"""

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx2
import openai
import orjson
from django.conf import settings


@dataclass(frozen=True)
class Chunk:
    text: str = ""
    usage: dict[str, int] | None = None


class ProviderError(Exception):
    """The provider could not produce a reply; `message` is safe to show to the user (it is
    their own request). `summary` is what went wrong without the provider's own words,
    `provider_text`, which can quote the prompt back: the part for the logs."""

    def __init__(
        self,
        summary: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        provider_text: str = "",
        kind: str = "connection",
        status: int | None = None,
    ) -> None:
        message = f"{summary}: {provider_text}" if provider_text else summary
        super().__init__(message)
        self.message = message
        self.summary = summary
        self.retryable = retryable
        self.retry_after = retry_after  # seconds the provider asked us to wait, if it did
        # For the metrics: "status" (an HTTP error, with its status), "connection" (not
        # reached, or the stream broke off), "malformed" (an event not JSON), "event" (an
        # error event in the stream).
        self.kind = kind
        self.status = status


class Provider(Protocol):
    name: str
    base_url: str  # where the requests go: each has its own circuit breaker (breaker.py)

    # An async generator: the caller closes it (aclose) to end the HTTP stream early.
    def stream(
        self, *, messages: list[dict[str, str]], model: str
    ) -> AsyncGenerator[Chunk, None]: ...

    async def complete(self, *, messages: list[dict[str, str]], model: str, max_tokens: int) -> str:
        """A small answer, whole (not streamed): a conversation's title (titles.py)."""

    async def aclose(self) -> None:
        """Close the provider's connections (the worker is stopping)."""


def demo_mode_active() -> bool:
    return not settings.OPENAI_API_KEY


def model_default() -> str:
    return settings.LLM_DEMO_MODEL if demo_mode_active() else settings.LLM_MODEL


def provider_get() -> Provider:
    if demo_mode_active():
        return DemoProvider()
    return OpenAIProvider(
        api_key=settings.OPENAI_API_KEY,
        base_url=settings.OPENAI_BASE_URL,
        timeout=settings.LLM_REQUEST_TIMEOUT_SECONDS,
    )


class OpenAIProvider:
    name = "openai"

    def __init__(self, *, api_key: str, base_url: str | None, timeout: float) -> None:
        # Retries are the worker's (generation.py): it knows whether text was already sent.
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,
            # The client's aiohttp transport (openai[aiohttp]) instead of its default,
            # httpcore over anyio: reading a streamed reply costs 36-39 µs of CPU per token
            # instead of 81-85 (100 streams, docs/performance.md). The client still maps
            # its errors and timeouts to httpx2's, which `stream` catches.
            http_client=openai.DefaultAioHttpClient(timeout=timeout),
        )
        self.base_url = str(self.client.base_url)

    async def aclose(self) -> None:
        await self.client.close()

    async def stream(
        self, *, messages: list[dict[str, str]], model: str
    ) -> AsyncGenerator[Chunk, None]:
        # The real client's raw response, not its parsed chunks: the client still owns auth,
        # base URL, timeouts and the mapping of HTTP errors, but building a pydantic object
        # per chunk cost 230 µs of the worker's CPU per token, parsing the line with orjson
        # about 30. Its generic `post` (its documented way to undocumented requests), not
        # `chat.completions.create`: that walked every parameter against its typed
        # definition, and the prompt against every variant of its message union, before the
        # request left, for a body that is plain JSON already (docs/performance.md).
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            response = await self.client.post(
                "/chat/completions", cast_to=httpx2.Response, body=body, stream=True
            )
            try:
                async for chunk in _event_chunks(response.aiter_bytes()):
                    yield chunk
            finally:
                await response.aclose()  # a cancelled job stops paying at once
        except _CLIENT_ERRORS as error:
            raise _provider_error(error) from error

    async def complete(self, *, messages: list[dict[str, str]], model: str, max_tokens: int) -> str:
        # Parsed by the client: one small answer, not a chunk per token.
        try:
            completion = await self.client.chat.completions.create(
                model=model, messages=[], extra_body={"messages": messages}, max_tokens=max_tokens
            )
        except _CLIENT_ERRORS as error:
            raise _provider_error(error) from error
        return "".join(choice.message.content or "" for choice in completion.choices[:1])


# The client maps errors of the request; those of reading its stream are httpx's.
_CLIENT_ERRORS = (openai.APIStatusError, openai.APIConnectionError, httpx2.RequestError)


def _provider_error(error: Exception) -> ProviderError:
    if isinstance(error, openai.APIStatusError):
        return ProviderError(
            f"The model provider refused the request ({error.status_code})",
            provider_text=_error_text(error),
            retryable=error.status_code in (408, 409, 429) or error.status_code >= 500,
            retry_after=_retry_after(error.response.headers),
            kind="status",
            status=error.status_code,
        )
    return ProviderError(
        f"The model provider could not be reached or broke off: {_first_cause(error)!r}",
        retryable=True,
    )


def _first_cause(error: BaseException) -> BaseException:
    """What went wrong first: the client wraps its transport's errors, and the aiohttp
    transport maps a refused connection to a timeout, say."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


# How long the end of a response may take to come after its [DONE] event.
REST_READ_SECONDS = 1.0


async def _event_chunks(body: AsyncIterator[bytes]) -> AsyncIterator[Chunk]:
    """The chunks of an event stream's body, until its [DONE]. The bytes are split into lines
    here: httpx's iter_lines decodes them to text and splits them in three generators of its
    own, every line (two per event) passing through each."""
    unfinished = b""
    async for received in body:
        events, unfinished = _event_data(unfinished + received)
        for data in events:
            if data == b"[DONE]":
                await _rest_read(body)
                return
            yield _chunk_from_data(data)
    for data in _event_data(unfinished + b"\n")[0]:  # a last line without its end
        if data != b"[DONE]":
            yield _chunk_from_data(data)


def _event_data(received: bytes) -> tuple[list[bytes], bytes]:
    """The data of the whole `data:` lines of an event stream's `received` bytes (the blank
    line after each event and comments, the keep-alives, are left out), and the bytes after
    its last line end. A line ends in \\n, \\r\\n or \\r."""
    if b"\r" in received:
        received = received.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    *lines, unfinished = received.split(b"\n")
    return [line[5:].strip() for line in lines if line.startswith(b"data:")], unfinished


async def _rest_read(body: AsyncIterator[bytes]) -> None:
    """Read what follows [DONE], the end of the response's body (the last, empty chunk). A
    response closed before its end has been read closes its connection too; read to the end,
    it goes back to the client's pool, and the next reply skips a TCP (and TLS) handshake.
    A provider that keeps the response open after [DONE] loses its connection instead."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(REST_READ_SECONDS):
            async for _ in body:
                pass


def _chunk_from_data(data: bytes) -> Chunk:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise ProviderError(
            "The model provider sent a malformed event",
            provider_text=repr(data[:200].decode(errors="replace")),
            retryable=True,
            kind="malformed",
        ) from error
    if not isinstance(event, dict):
        return Chunk()
    if event.get("error"):
        raise ProviderError(
            "The model provider failed",
            provider_text=_event_error_text(event),
            retryable=True,
            kind="event",
        )
    return _chunk_from_event(event)


def _chunk_from_event(event: dict[str, Any]) -> Chunk:
    text = "".join(
        (choice.get("delta") or {}).get("content") or "" for choice in event.get("choices") or ()
    )
    usage = event.get("usage")
    if not isinstance(usage, dict):
        return Chunk(text=text)
    return Chunk(
        text=text,
        usage={
            name: int(usage.get(name) or 0)
            for name in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    )


def _event_error_text(event: dict[str, Any]) -> str:
    error = event["error"]
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(error)[:200]


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _error_text(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        nested = body.get("error", body)
        if isinstance(nested, dict) and nested.get("message"):
            return str(nested["message"])
    return error.message


# Markdown, so that a first-time user sees what the page renders: a table and a code block.
DEMO_REPLY = """[Demo model] This is a canned reply from Grizz's built-in demo model, streamed \
token by token so you can see the pipeline work. Set `OPENAI_API_KEY` (and \
`OPENAI_BASE_URL` for any OpenAI-compatible server) to talk to a real model.

Answers are rendered as **Markdown** while they stream:

| Setting | What it does |
| --- | --- |
| `OPENAI_API_KEY` | the key of your provider |
| `OPENAI_BASE_URL` | vLLM, Ollama, llama.cpp... |
| `LLM_MODEL` | the model to ask |

```python
import os

os.environ["OPENAI_API_KEY"] = "sk-..."  # then restart the worker
```
"""
# Words with the whitespace before them: joined, the tokens give the reply back exactly.
_DEMO_TOKENS = re.findall(r"\s*\S+|\s+", DEMO_REPLY)


class DemoProvider:
    name = "demo"
    base_url = "demo:"

    def __init__(self, *, interval: float = 0.03) -> None:
        self.interval = interval

    async def aclose(self) -> None:
        pass

    async def complete(self, *, messages: list[dict[str, str]], model: str, max_tokens: int) -> str:
        # Nothing to ask: a conversation keeps the first words of its first message.
        return ""

    async def stream(
        self, *, messages: list[dict[str, str]], model: str
    ) -> AsyncGenerator[Chunk, None]:
        words = _DEMO_TOKENS
        for word in words:
            await asyncio.sleep(self.interval)
            yield Chunk(text=word)
        yield Chunk(
            usage={
                "prompt_tokens": sum(len(m["content"].split()) for m in messages),
                "completion_tokens": len(words),
                "total_tokens": sum(len(m["content"].split()) for m in messages) + len(words),
            }
        )
