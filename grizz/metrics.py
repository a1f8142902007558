"""Prometheus metrics (docs/metrics.md): what each process counts, and where it is served.

Each process counts what happens in it, in memory: an update is a lock and an addition
(about 1 µs), never a Redis round trip, and nothing is updated per token or per relayed
frame (tokens are counted per provider call). The metrics of a role are made on first use
(`web()`, `worker()`), so that a web process does not show the worker's at zero, nor the
reverse, although both import the same modules.

Where they are served:
- the web (grizz/metrics_views.py): `/metrics` (its own figures) and `/metrics/cluster`
  (the queue, consumers, dead letters and Redis memory, read from Redis at scrape time);
- one worker: `--metrics-port`, on LLM_WORKER_METRICS_BIND (127.0.0.1 by default);
- a supervised pool: its supervisor, on `--metrics-port`, sums its children's figures with
  prometheus-client's multiprocess mode (`PoolMetrics`): one target however many children
  it runs or restarts.
"""

import functools
import shutil
import tempfile
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# The web

MESSAGE_REFUSALS = ("overloaded", "rate", "inflight", "busy", "unavailable")


@dataclass(frozen=True)
class WebMetrics:
    sockets_open: Gauge
    socket_refusals: Counter
    socket_resumes: Counter
    hub_reconnects: Counter
    message_refusals: Counter


@functools.cache
def web() -> WebMetrics:
    refusals = Counter(
        "grizz_admission_refusals",
        "Messages refused before anything was saved, by reason",
        ["reason"],
    )
    for reason in MESSAGE_REFUSALS:
        refusals.labels(reason)  # shown at 0: a rate needs the series before its first event
    return WebMetrics(
        sockets_open=Gauge(
            "grizz_sockets_open", "Chat sockets open on this process", multiprocess_mode="livesum"
        ),
        socket_refusals=Counter(
            "grizz_socket_refusals", "Chat sockets refused at connect, by close code", ["code"]
        ),
        socket_resumes=Counter(
            "grizz_socket_resumes", "resume frames: clients reconnected mid-reply"
        ),
        hub_reconnects=Counter(
            "grizz_reply_hub_reconnects", "Reconnections of the web's pub/sub connection"
        ),
        message_refusals=refusals,
    )


# The workers

OUTCOMES = ("complete", "failed", "cancelled", "retried", "reclaimed", "dead_lettered")
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
# From enqueue: a job normally starts within milliseconds, and waits seconds only when every
# worker is busy.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
STREAM_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class WorkerMetrics:
    replies_counter: Counter
    replies: dict[str, Counter]  # by outcome, bound once: no label lookup per reply
    queue_wait: Histogram
    first_token: Histogram
    first_token_to_done: Histogram
    tokens_streamed: Counter
    provider_tokens: Counter
    provider_errors: Counter
    circuit_state: Gauge
    slots_busy: Gauge
    slots_free: Gauge
    titles: Counter

    def reply(self, outcome: str, count: int = 1) -> None:
        self.replies[outcome].inc(count)

    def provider_error(self, *, provider: str, kind: str, status: int | None) -> None:
        self.provider_errors.labels(provider, kind, "" if status is None else str(status)).inc()

    def circuit(self, *, provider: str, state: str) -> None:
        self.circuit_state.labels(provider).set(CIRCUIT_STATES[state])

    def totals(self) -> dict[str, int]:
        """Replies by outcome and tokens streamed, since this process started."""
        found = {outcome: 0 for outcome in OUTCOMES}
        for family in (*self.replies_counter.collect(), *self.tokens_streamed.collect()):
            for sample in family.samples:
                if sample.name == "grizz_replies_total":
                    found[sample.labels["outcome"]] = int(sample.value)
                elif sample.name == "grizz_tokens_streamed_total":
                    found["tokens"] = int(sample.value)
        return found


@functools.cache
def worker() -> WorkerMetrics:
    replies = Counter("grizz_replies", "Replies by outcome (see docs/metrics.md)", ["outcome"])
    return WorkerMetrics(
        replies_counter=replies,
        replies={outcome: replies.labels(outcome) for outcome in OUTCOMES},
        queue_wait=Histogram(
            "grizz_queue_wait_seconds",
            "From enqueue to a worker taking the job (first deliveries)",
            buckets=WAIT_BUCKETS,
        ),
        first_token=Histogram(
            "grizz_reply_first_token_seconds",
            "From enqueue to the reply's first token, per delivery",
            buckets=FIRST_TOKEN_BUCKETS,
        ),
        first_token_to_done=Histogram(
            "grizz_reply_first_token_to_done_seconds",
            "From the first token to the end of a complete reply",
            buckets=STREAM_BUCKETS,
        ),
        tokens_streamed=Counter(
            "grizz_tokens_streamed", "Text chunks (tokens) streamed from the provider"
        ),
        provider_tokens=Counter(
            "grizz_provider_usage_tokens",
            "Tokens the provider reported in usage, prompt and completion, of complete replies",
            ["kind"],
        ),
        provider_errors=Counter(
            "grizz_provider_errors",
            "Failed provider calls, by provider, kind and HTTP status",
            ["provider", "kind", "status"],
        ),
        circuit_state=Gauge(
            "grizz_provider_circuit_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open (worst of a pool)",
            ["provider"],
            multiprocess_mode="livemax",
        ),
        slots_busy=Gauge(
            "grizz_worker_slots_busy",
            "Replies running (of --concurrency)",
            multiprocess_mode="livesum",
        ),
        slots_free=Gauge(
            "grizz_worker_slots_free",
            "Replies a worker could still take (--concurrency less those running)",
            multiprocess_mode="livesum",
        ),
        titles=Counter(
            "grizz_titles", "Conversation titles by outcome (see docs/metrics.md)", ["outcome"]
        ),
    )


# Serving: the workers'


class MetricsServer:
    """prometheus-client's HTTP server on a thread of its own: a scrape takes no time from
    the worker's event loop beyond the GIL while it renders the text."""

    def __init__(self, *, port: int, bind: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.server: WSGIServer
        self.thread: threading.Thread
        self.server, self.thread = start_http_server(port, addr=bind, registry=registry)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PoolMetrics:
    """A supervised pool's metrics on one port: each child writes its figures to files in a
    directory of the supervisor's (PROMETHEUS_MULTIPROC_DIR, set in the child's environment
    before it imports prometheus-client), and the supervisor sums them at scrape time.
    Counters and histograms of children that exited stay in the sums (they are totals);
    the gauges of a child are removed when it exits (`child_exited`)."""

    def __init__(self, *, port: int, bind: str) -> None:
        # Private, and new for each supervisor: files left by an earlier run must not count.
        self.directory = tempfile.mkdtemp(prefix="grizz-metrics-")
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        self.restarts = Counter(
            "grizz_worker_restarts",
            "Worker processes the supervisor restarted after they exited unasked",
            registry=registry,
        )
        try:
            self.server = MetricsServer(port=port, bind=bind, registry=registry)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def child_env(self) -> dict[str, str]:
        return {"PROMETHEUS_MULTIPROC_DIR": self.directory}

    def child_exited(self, pid: int) -> None:
        mark_process_dead(pid, self.directory)

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.directory, ignore_errors=True)
