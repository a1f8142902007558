"""The bench's deterministic model: the tests' FakeOpenAI, answering every streamed chat
request with stamped tokens (see bench/protocol.py)::

    python -m bench.model_server --port 0 --ttft-ms 50 --tokens 20 --interval-ms 50

It reuses FakeOpenAI's HTTP serving and bookkeeping and replaces only the answer, because a
stamp must be taken when its token is written, and FakeOpenAI renders its tokens up front.
Tokens follow an absolute schedule from the request's arrival (arrival + ttft + i*interval),
so a late wake-up does not push every later token back; the stamps show any lateness.
"""

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.protocol import ReplyShape, token_text
from grizz.eventloop import event_loop_policy_install
from tests.support import fake_openai as fake

_STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Transfer-Encoding": "chunked",
}


class StampedModel(fake.FakeOpenAI):
    def __init__(self, shape: ReplyShape, host: str = "127.0.0.1", port: int = 0) -> None:
        # No request history: a bench run sends far too many requests to keep.
        super().__init__(host=host, port=port, max_history=0)
        self.shape = shape

    async def _chat(self, conn: fake._Connection, request: fake._Request) -> bool:
        arrival_ns = time.monotonic_ns()
        body = fake._parse_json_object(request.body)
        if body is None or body.get("stream") is not True:
            message = "The bench model answers streamed chat requests only."
            await conn.write(fake._error_response(400, message, keep_alive=request.keep_alive))
            return request.keep_alive
        _, call, generation = self._admit(body)  # FakeOpenAI's counters; not its behaviour
        try:
            return await self._stream(conn, call, self._shape_of(body), arrival_ns, request)
        finally:
            self._finish(generation, None)

    def _shape_of(self, body: dict[str, Any]) -> ReplyShape:
        messages = body.get("messages") or []
        last = messages[-1].get("content", "") if messages else ""
        return ReplyShape.from_text(last if isinstance(last, str) else "") or self.shape

    async def _stream(
        self,
        conn: fake._Connection,
        call: fake._ChatCall,
        shape: ReplyShape,
        arrival_ns: int,
        request: fake._Request,
    ) -> bool:
        head = fake._response_head(200, _STREAM_HEADERS, keep_alive=request.keep_alive)
        await conn.write(head + fake._sse_frame(call.chunk({"role": "assistant", "content": ""})))
        first_due = arrival_ns + int(shape.ttft_ms * 1e6)
        for index in range(shape.tokens):
            await _sleep_until(first_due + int(index * shape.interval_ms * 1e6))
            emit_ns = time.monotonic_ns()
            text = token_text(emit_ns=emit_ns, arrival_ns=arrival_ns if index == 0 else None)
            await conn.write(fake._sse_frame(call.chunk({"content": text})))
        tail = fake._stream_tail(call, fake.Behaviour(), shape.tokens)
        await conn.write(tail)
        return request.keep_alive


async def _sleep_until(due_ns: int) -> None:
    delay = (due_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The bench's stamped OpenAI-compatible model.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    shape = ReplyShape(ttft_ms=args.ttft_ms, tokens=args.tokens, interval_ms=args.interval_ms)
    # Block the signals before the server thread starts, so that only sigwait() sees them.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    event_loop_policy_install()  # as Grizz's processes: the model's CPU is the box's too
    server = StampedModel(shape, args.host, args.port).start()
    print(f"listening on {server.base_url}", flush=True)
    signal.sigwait(stop_signals)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
