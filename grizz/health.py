"""Health endpoints for the platform's probes: `/healthz` (the process answers) and `/readyz`
(it can serve: PostgreSQL and Redis answer).

Neither needs a signed-in user nor a session: the middleware load both lazily, and these
views never touch them, so a probe costs no database query of its own. Kubernetes-style
liveness must not depend on other services (a Redis outage would otherwise get every web
process restarted), which is why only `/readyz` looks at them.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from grizz.database import database_call
from llmworker.redis import redis_get

logger = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 1.0


@never_cache
@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


@never_cache
@require_safe
async def readyz(request: HttpRequest) -> JsonResponse:
    """200 when every part answers within READY_TIMEOUT_SECONDS, else 503; the body names
    each part's state ("ok", "timeout" or "error"). The errors themselves go to the log,
    not to an unauthenticated caller."""
    names = ("postgresql", "redis")
    states = await asyncio.gather(
        _state_of("postgresql", _postgresql_ping), _state_of("redis", _redis_ping)
    )
    parts = dict(zip(names, states, strict=True))
    ready = all(state == "ok" for state in states)
    body = {"status": "ready" if ready else "unavailable", "parts": parts}
    return JsonResponse(body, status=200 if ready else 503)


async def _state_of(name: str, ping: Callable[[], Awaitable[object]]) -> str:
    try:
        await asyncio.wait_for(ping(), READY_TIMEOUT_SECONDS)
    except TimeoutError:
        logger.warning("readyz: %s did not answer within %ss", name, READY_TIMEOUT_SECONDS)
        return "timeout"
    except Exception as error:
        logger.warning("readyz: %s failed: %s", name, error)
        return "error"
    return "ok"


def _postgresql_select_one() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


# A thread of its own, not the database threads of the chat (grizz/database.py): a ping
# stuck on an unreachable server holds it, and probes must not starve the chat's calls.
_postgresql_ping = database_call(
    _postgresql_select_one,
    executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix="readyz"),
)


async def _redis_ping() -> None:
    await redis_get().ping()
