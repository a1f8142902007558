"""The dead-letter stream as a test reads it. A worker writes a job's dead letter just
after the error frame a test waits for, so reading waits for the entries to be there."""

import asyncio
from typing import cast

from llmworker.redis import StreamsRead, dead_letter_key, redis_get


async def dead_letters_once_written(count: int = 1, timeout: float = 30) -> list[dict[str, str]]:
    """The first `count` dead letters (every one written by then, at least `count`),
    blocking on the stream until they are there."""
    letters: list[dict[str, str]] = []
    last_id = "0"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(letters) < count:
        remaining_ms = int((deadline - loop.time()) * 1000)
        assert remaining_ms > 0, f"{len(letters)} of {count} dead letters within {timeout}s"
        read = await redis_get().xread({dead_letter_key(): last_id}, block=remaining_ms)
        streams = cast(StreamsRead, read)
        for _, entries in streams:
            letters += [fields for _, fields in entries]
            last_id = entries[-1][0]
    return letters
