"""The web's metrics endpoints (docs/metrics.md): `/metrics`, this process's figures, and
`/metrics/cluster`, the deployment's queue as Redis has it at scrape time.

The cluster figures are llm_status's (queue_status): the same whichever web process is
asked, so Prometheus scrapes them once, through the load balancer, instead of once per web
process or worker. Both answer a bearer of METRICS_TOKEN or a staff session, and 404 to
anyone else: never open to the internet by default.
"""

import asyncio
import hmac
import logging
from collections.abc import Iterable

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from llmworker.status import QueueStatus, queue_status

logger = logging.getLogger(__name__)

CLUSTER_TIMEOUT_SECONDS = 5.0


@never_cache
@require_safe
async def metrics(request: HttpRequest) -> HttpResponse:
    """This web process's figures."""
    await _authorize(request)
    return _exposition(REGISTRY)


@never_cache
@require_safe
async def metrics_cluster(request: HttpRequest) -> HttpResponse:
    """The deployment's queue as Redis has it now; 503 when Redis does not answer."""
    await _authorize(request)
    try:
        status = await asyncio.wait_for(queue_status(), CLUSTER_TIMEOUT_SECONDS)
    except (RedisError, OSError, TimeoutError) as error:
        logger.warning("metrics: cannot read the queue from Redis: %r", error)
        return HttpResponse("Redis unavailable\n", status=503, content_type="text/plain")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(cluster_families(status)))
    return _exposition(registry)


async def _authorize(request: HttpRequest) -> None:
    """A bearer of METRICS_TOKEN, or a staff session; 404 for anyone else, so that the
    internet does not even learn the path exists."""
    header = request.headers.get("Authorization", "")
    token = settings.METRICS_TOKEN
    if token and hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
        return
    if header.startswith("Bearer "):
        logger.warning("metrics: refused a bearer token that is not METRICS_TOKEN")
    user = await request.auser()
    if not (user.is_active and user.is_staff):
        raise Http404()


def _exposition(registry: CollectorRegistry) -> HttpResponse:
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def cluster_families(status: QueueStatus) -> list[Metric]:
    """The figures of llm_status, as Prometheus gauges."""
    streams = [
        ("length", "Jobs on the stream: waiting or pending (finished ones are deleted)"),
        ("waiting", "Jobs no worker has taken yet"),
        ("pending", "Jobs delivered to a worker and not acknowledged"),
        ("oldest_waiting_age_seconds", "Age of the oldest job no worker has taken (0: none)"),
        ("oldest_pending_age_seconds", "Age of the oldest job a worker holds (0: none)"),
    ]
    families: list[Metric] = []
    for name, documentation in streams:
        family = GaugeMetricFamily(f"grizz_queue_{name}", documentation, labels=["priority"])
        for stream in status.streams:
            family.add_metric([stream.priority], getattr(stream, name) or 0)
        families.append(family)
    families += _consumer_families(status)
    dead, memory = status.dead_letters, status.redis_memory
    families += [
        GaugeMetricFamily("grizz_dead_letters", "Jobs on the dead-letter stream", dead.count),
        GaugeMetricFamily(
            "grizz_dead_letters_oldest_age_seconds",
            "Age of the oldest dead letter (0: none)",
            dead.oldest_age_seconds or 0,
        ),
        GaugeMetricFamily(
            "grizz_redis_used_memory_bytes", "Redis's used_memory", memory.used_bytes
        ),
        GaugeMetricFamily(
            "grizz_redis_maxmemory_bytes", "Redis's maxmemory (0: no limit)", memory.max_bytes
        ),
    ]
    return families


def _consumer_families(status: QueueStatus) -> list[Metric]:
    pending = GaugeMetricFamily(
        "grizz_consumer_pending_jobs", "Jobs each consumer of the group holds", labels=["consumer"]
    )
    idle = GaugeMetricFamily(
        "grizz_consumer_idle_seconds",
        "Since each consumer's last read or lease renewal",
        labels=["consumer"],
    )
    for consumer in status.consumers:
        pending.add_metric([consumer.name], consumer.pending)
        idle.add_metric([consumer.name], consumer.idle_seconds)
    return [pending, idle]
