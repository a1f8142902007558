"""Test fixtures: the real PostgreSQL and Redis of this machine, a loopback OpenAI-compatible
server, and real `run_llm_worker` / daphne processes.

Two runs on one machine never collide: each gets its own database (test_grizz_<pid>) and its
own Redis key prefix, deleted at the end.
"""

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import SyncToAsync
from django.conf import settings
from django.contrib.auth.models import User
from django.db import close_old_connections
from pytest_django import DjangoDbBlocker
from pytest_django.fixtures import Settings

from chat.models import Conversation
from chat.services import conversation_create
from llmworker import redis as grizz_redis
from llmworker import replies
from tests.support.fake_openai import Behaviour, FakeOpenAI
from tests.support.processes import (
    ServiceProcess,
    daphne_start,
    free_port,
    pool_start,
    worker_start,
)

RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"


def pytest_configure(config: pytest.Config) -> None:
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        pytest.exit("The tests run on PostgreSQL: use `make test`, or set DATABASE_URL.", 2)
    settings.REDIS_KEY_PREFIX = f"grizz-test-{RUN_ID}"
    settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = f"grizz-test-{RUN_ID}:layer:"


@pytest.fixture(scope="session")
def django_db_modify_db_settings() -> None:
    settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = f"test_grizz_{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _test_database_released_at_exit(django_db_setup: None) -> Iterator[None]:
    """Connections held by sync_to_async's threads would keep the test database from being
    dropped at the end; end them first, from the server's maintenance database."""
    yield
    import psycopg

    db = settings.DATABASES["default"]
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname="postgres", autocommit=True
    ) as maintenance:
        maintenance.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            [db["TEST"]["NAME"]],
        )


@pytest.fixture(scope="session", autouse=True)
def _redis_keys_removed_at_exit() -> Iterator[None]:
    yield
    _redis_keys_delete()


@pytest.fixture(autouse=True)
def _thread_sensitive_connection_tidied(django_db_blocker: DjangoDbBlocker) -> None:
    """The tests' own sync_to_async calls run on asgiref's one thread-sensitive thread, whose
    database connection lives from test to test. Tidied before each test as Django tidies a
    request's (close_old_connections: a connection an earlier test's PostgreSQL outage broke
    is replaced, one left fine is checked before its next use), so that one test's outage
    does not fail the next ones. In every test: the connection outlives the tests that made
    it, and the blocker would refuse its check in one without the database."""
    with django_db_blocker.unblock():
        SyncToAsync.single_thread_executor.submit(close_old_connections).result()


@pytest.fixture(autouse=True)
def _redis_keys_of_earlier_tests_removed() -> None:
    """Each test starts with none of this run's keys: an empty queue, no dead letters."""
    _redis_keys_delete()


def _redis_keys_delete() -> None:
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    # "{prefix*": the keys of processes a test runs under a prefix of its own (prefix-...) too.
    for pattern in (f"{{{settings.REDIS_KEY_PREFIX}*", f"{settings.REDIS_KEY_PREFIX}:*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    client.close()


@pytest.fixture
def private_redis(settings) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of the test's own, which it may stop (SIGSTOP: hung) or kill without
    disturbing anyone else's Redis; the test's settings point at it (a process started by
    the test needs service_env["REDIS_URL"] = settings.REDIS_URL)."""
    import redis

    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:  # a new server needs a moment before it listens; nothing to wait on but it
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    grizz_redis._clients.clear()
    replies._hubs.clear()
    yield server
    server.send_signal(signal.SIGCONT)
    server.terminate()
    server.wait(timeout=10)
    grizz_redis._clients.clear()
    replies._hubs.clear()


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def fake_llm(fake_llm_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    fake_llm_server.reset()
    fake_llm_server.default = Behaviour()
    yield fake_llm_server
    fake_llm_server.reset()


def _database_url() -> str:
    db = settings.DATABASES["default"]
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


# What a Python process needs of this one's environment; nothing that configures Grizz.
# (PG*: how libpq reaches the test database, e.g. PGPASSWORD, as it does for pytest.)
_PASSED_ENV = {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "VIRTUAL_ENV"}
_PASSED_ENV_PREFIXES = ("PYTHON", "PG")


def _process_basics() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name in _PASSED_ENV or name.startswith(_PASSED_ENV_PREFIXES)
    }


@pytest.fixture
def service_env(fake_llm: FakeOpenAI, transactional_db: None) -> dict[str, str]:
    """The environment of a Grizz process that shares this test's database and Redis: the
    test's settings only, whatever the developer's shell exports."""
    return service_env_for(fake_llm)


def service_env_for(fake_llm: FakeOpenAI) -> dict[str, str]:
    """service_env, for processes that outlive one test (tests/test_browser.py's)."""
    return {
        **_process_basics(),
        "DATABASE_URL": _database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX,
        "OPENAI_API_KEY": "test-key",
        "OPENAI_BASE_URL": fake_llm.base_url,
        "LLM_MODEL": "fake-model",
        # Quick retries: the tests check that they happen, not how long they wait.
        "LLM_RETRY_BASE_SECONDS": "0.05",
        "LLM_RETRY_MAX_SECONDS": "0.5",
        # Off but where a test turns them on (tests/test_titles.py): a title is one more
        # request to the fake model, which would take a behaviour scripted for a reply.
        "LLM_TITLES": "0",
        "DJANGO_SECRET_KEY": settings.SECRET_KEY,
        "DJANGO_DEBUG": "0",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def worker(service_env: dict[str, str]) -> Iterator[ServiceProcess]:
    process = worker_start(env=service_env, name=f"w1-{RUN_ID}")
    yield process
    process.stop()
    print(f"--- worker output ---\n{process.output}")  # shown on failure


@pytest.fixture
def start_worker(service_env: dict[str, str]) -> Iterator[Callable[..., ServiceProcess]]:
    """Start more workers within one test (`env`: settings of the test's own); each is
    stopped at its end."""
    started: list[ServiceProcess] = []

    def start(
        name: str | None, *, env: dict[str, str] | None = None, **options: Any
    ) -> ServiceProcess:
        named = None if name is None else f"{name}-{RUN_ID}"  # None: <host>-<n>
        process = worker_start(env={**service_env, **(env or {})}, name=named, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        print(f"--- output of {process.args[3]} ---\n{process.output}")  # shown on failure


@pytest.fixture
def start_pool(service_env: dict[str, str]) -> Iterator[Callable[..., ServiceProcess]]:
    """Start supervised worker pools (`start("pool", processes=2)`: children pool-<run>-0
    and pool-<run>-1); each still running is stopped at the test's end."""
    started: list[ServiceProcess] = []

    def start(name: str, **options: Any) -> ServiceProcess:
        process = pool_start(env=service_env, name=f"{name}-{RUN_ID}", **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        print(f"--- output of the pool {process.args[3]} ---\n{process.output}")  # on failure


@pytest.fixture
def start_daphne(service_env: dict[str, str]) -> Iterator[Callable[..., ServiceProcess]]:
    """Start daphne with settings of the test's own (`start(WS_IDLE_TIMEOUT_SECONDS="1")`);
    each is stopped at the test's end."""
    started: list[ServiceProcess] = []

    def start(**env: str) -> ServiceProcess:
        process = daphne_start(env={**service_env, **env}, port=free_port())
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        print(f"--- daphne output ---\n{process.output}")  # shown on failure


@pytest.fixture
def daphne(start_daphne: Callable[..., ServiceProcess]) -> ServiceProcess:
    return start_daphne()


@pytest.fixture
def limits(settings: Settings) -> Settings:
    """The settings, with every admission limit off: each test turns on the one it checks."""
    settings.CHAT_RATE_LIMIT = (0, 60)
    settings.CHAT_MAX_INFLIGHT_PER_USER = 0
    settings.CHAT_LIMITS_EXEMPT_STAFF = False
    return settings


@pytest.fixture
def offered_models(settings: Settings) -> list[str]:
    """A deployment with a real provider (not the demo model) offering two models, the
    default (fake-model, as in service_env) first."""
    settings.OPENAI_API_KEY = "test-key"
    settings.LLM_MODEL = "fake-model"
    settings.LLM_MODELS = ["fake-model", "fake-large"]
    return list(settings.LLM_MODELS)


@pytest.fixture
def alice(transactional_db: None) -> User:
    return User.objects.create_user("alice", password="alice-password-1")


@pytest.fixture
def bob(transactional_db: None) -> User:
    return User.objects.create_user("bob", password="bob-password-1")


@pytest.fixture
def conversation(alice: User) -> Conversation:
    """A conversation of alice's, with no message yet."""
    return conversation_create(owner=alice, title="Alice's chat")


@pytest.fixture(params=["statement", "unprepared statement", "orm"])
def both_database_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs a test on PostgreSQL's written-out statements of chat/services.py, prepared (the
    default) and not (DATABASE_PREPARED_STATEMENTS=0), and on the ORM's steps of
    chat/portable.py that other databases (the quick start's SQLite) take."""
    if request.param == "unprepared statement":
        monkeypatch.setattr(settings, "DATABASE_PREPARED_STATEMENTS", False)
    if request.param == "orm":
        from chat import services

        monkeypatch.setattr(services, "_on_postgresql", lambda: False)
