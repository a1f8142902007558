"""llmworker/redis.py's clients tell Redis the library and its version on every connection
(CLIENT SETINFO, for an operator's CLIENT LIST), read once: redis-py would otherwise scan
the installed packages' metadata on the event loop for each connection it makes."""

from typing import Any

import pytest
import redis
import redis.utils

from llmworker.redis import redis_get, redis_pubsub_client, redis_sync_client

pytestmark = [pytest.mark.asyncio]


@pytest.fixture
def metadata_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []

    def get_lib_version() -> str:
        reads.append("read")
        return "from the metadata"

    monkeypatch.setattr(redis.utils, "get_lib_version", get_lib_version)
    return reads


async def test_new_connections_name_the_library_without_reading_package_metadata(
    metadata_reads: list[str],
) -> None:
    pooled, hub = redis_get(), redis_pubsub_client("test")
    supervisor = redis_sync_client(purpose="test", timeout=1)
    try:
        connections: list[Any] = [
            pooled.connection_pool.make_connection(),
            hub.connection_pool.make_connection(),
            supervisor.connection_pool.make_connection(),
        ]
        assert await pooled.ping()
    finally:
        await hub.aclose()
        supervisor.close()
    for connection in connections:
        assert connection.driver_info.name == "redis-py"
        assert connection.driver_info.lib_version == redis.__version__
    assert metadata_reads == []
