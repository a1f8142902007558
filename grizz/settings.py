"""Grizz settings: one file, driven by environment variables (see README "Settings").

Every variable is read through a small helper that rejects a malformed value at start-up,
so a typo in production fails loudly instead of running with a silent default.
"""

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

# Lets Django's generic classes take type parameters at run time too (ModelAdmin[Message]),
# as they do in the type stubs that mypy checks them against.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


def envstr(name: str, default: str) -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {value!r}")


def envint(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, got {number}")
    return number


def envfloat(name: str, default: float, *, minimum: float = 0.0) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    return number


def envrate(name: str, default: str) -> tuple[int, int]:
    """A rate such as "20/min": (count, window in seconds)."""
    value = envstr(name, default)
    windows = {
        "s": 1,
        "sec": 1,
        "second": 1,
        "m": 60,
        "min": 60,
        "minute": 60,
        "h": 3600,
        "hour": 3600,
    }
    count, _, unit = value.partition("/")
    if not count.strip().isdigit() or unit.strip() not in windows:
        raise ImproperlyConfigured(f"{name} must look like 20/min (or /sec, /hour), got {value!r}")
    return int(count), windows[unit.strip()]


def envchoice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = envstr(name, default) or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def envlist(name: str, default: str) -> list[str]:
    return [item.strip() for item in envstr(name, default).split(",") if item.strip()]


def envnames(name: str, default: list[str], *, longest: int) -> list[str]:
    """Comma-separated names, each given once and at most `longest` characters; unset or
    empty: the default. An empty name ("a,,b", a trailing comma) is a typo, not a name."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    names = [item.strip() for item in value.split(",")]
    if "" in names:
        raise ImproperlyConfigured(f"{name} must be names separated by commas, got {value!r}")
    repeated = sorted({item for item in names if names.count(item) > 1})
    if repeated:
        raise ImproperlyConfigured(f"{name} names {', '.join(repeated)} more than once")
    too_long = [item for item in names if len(item) > longest]
    if too_long:
        raise ImproperlyConfigured(f"{name}: {too_long[0]!r} is over {longest} characters")
    return names


def bounds_parse(value: str) -> tuple[int, int]:
    """`MIN,MAX` as two integers, 1 <= MIN <= MAX (ValueError otherwise). Also the parser of
    `run_llm_worker --autoscale`, so that the option and its variable take the same values."""
    least, _, most = value.partition(",")
    try:
        bounds = int(least), int(most)
    except ValueError:
        raise ValueError(f"must be MIN,MAX (two integers), got {value!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"must be MIN,MAX with 1 <= MIN <= MAX, got {value!r}")
    return bounds


def envbounds(name: str) -> tuple[int, int] | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return bounds_parse(value)
    except ValueError as error:
        raise ImproperlyConfigured(f"{name} {error}") from None


DEBUG = envbool("DJANGO_DEBUG", False)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off")
    # Only for local development: a fixed key would let anyone forge sessions in production.
    SECRET_KEY = "grizz-insecure-development-key-do-not-use-in-production"

ALLOWED_HOSTS = envlist("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = envlist("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served by whitenoise: no CDN
    "channels",
    "chat",
    "llmworker",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "grizz.urls"
ASGI_APPLICATION = "grizz.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# PostgreSQL in tests, CI and production. The quick start may run on an SQLite file:
# WAL and IMMEDIATE transactions let web and worker write at once without "database is locked".
DATABASES = {
    "default": dj_database_url.parse(
        envstr("DATABASE_URL", f"sqlite:///{BASE_DIR / 'var' / 'grizz.sqlite3'}"),
        # Persistent connections: opening one costs milliseconds, and the socket and the
        # worker touch the database at every turn. Checked before reuse.
        conn_max_age=envint("DATABASE_CONN_MAX_AGE", 300),
        conn_health_checks=True,
    )
}
# Threads, each with its own connection, for the database calls of a web or worker process
# (grizz/database.py).
DATABASE_THREADS = envint("DATABASE_THREADS", 8, minimum=1)
# Connections each event loop of a web or worker process keeps for the hot path's statements
# it awaits itself, without a thread (grizz/database.py LoopConnections).
DATABASE_LOOP_CONNECTIONS = envint("DATABASE_LOOP_CONNECTIONS", 4, minimum=1)
# A connection of those threads used within this many seconds, with nothing from the server
# waiting on its socket, skips the health check's round trip (grizz/database.py).
DATABASE_HEALTH_CHECK_IDLE_SECONDS = envint("DATABASE_HEALTH_CHECK_IDLE_SECONDS", 10)
# The hot path's statements prepared once per connection (grizz/database.py statement_rows).
# Off behind a pooler that cannot keep prepared statements (PgBouncer in transaction mode).
DATABASE_PREPARED_STATEMENTS = envbool("DATABASE_PREPARED_STATEMENTS", True)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # psycopg prepares nothing with a threshold of None (Django's default), not even a
    # statement run with prepare=True. One no statement reaches by count: only those are.
    DATABASES["default"]["OPTIONS"] = {"prepare_threshold": 2**31 - 1}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve static files without collectstatic in development and in the test suite.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "conversation-list"
LOGOUT_REDIRECT_URL = "login"
# How long a browser stays signed in (Django's SESSION_COOKIE_AGE, two weeks by default). An
# open chat page renews its session as it nears half of that (chat.views.session_refresh):
# the socket alone, which only reads the session, would let it lapse mid-conversation.
SESSION_COOKIE_AGE = envint("DJANGO_SESSION_COOKIE_AGE", 14 * 24 * 3600, minimum=60)

# HTTPS-only settings: off by default so that the service works over plain HTTP on 127.0.0.1;
# switch them on when TLS ends at a proxy in front of Grizz.
SECURE_SSL_REDIRECT = envbool("DJANGO_SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = envbool("DJANGO_SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = envbool("DJANGO_CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = envint("DJANGO_SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = envbool("DJANGO_SECURE_HSTS_PRELOAD", False)
if envbool("DJANGO_SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework_simplejwt.authentication.JWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # One error body across the API: {"error": {"code", "message", ...}} (chat/api_errors.py).
    "EXCEPTION_HANDLER": "chat.api_errors.api_exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Grizz API",
    "DESCRIPTION": (
        "Conversations, messages and replies of the signed-in user. Errors have one shape, "
        '`{"error": {"code", "message", ...}}`, with the chat socket\'s codes.'
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        # The reply stream is a plain async Django view, which drf-spectacular cannot see.
        "chat.stream.stream_schema_add",
    ],
}
SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(minutes=envint("JWT_ACCESS_MINUTES", 15, minimum=1)),
    "REFRESH_TOKEN_LIFETIME": timedelta(days=envint("JWT_REFRESH_DAYS", 7, minimum=1)),
}

# Redis: the job queue, the reply streams and the Channels layer.
REDIS_URL = envstr("REDIS_URL", "redis://127.0.0.1:6379/0")
# Every key Grizz writes starts with this prefix, inside a hash tag so that the keys one
# script touches share a Redis Cluster slot. Two deployments (or test runs) sharing a Redis
# must use different prefixes.
REDIS_KEY_PREFIX = envstr("REDIS_KEY_PREFIX", "grizz")
if not re.fullmatch(r"[A-Za-z0-9_.-]+", REDIS_KEY_PREFIX):
    raise ImproperlyConfigured("REDIS_KEY_PREFIX may hold only letters, digits, '_', '.', '-'")
REDIS_MAX_CONNECTIONS = envint("REDIS_MAX_CONNECTIONS", 50, minimum=2)

CHANNEL_LAYERS: dict[str, dict[str, Any]] = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [REDIS_URL],
            "prefix": f"{REDIS_KEY_PREFIX}:layer:",
        },
    }
}

# The chat.
CHAT_MAX_MESSAGE_CHARS = envint("CHAT_MAX_MESSAGE_CHARS", 32000, minimum=1)
# Frames larger than this are refused with too_long, the socket staying open. Frames over the
# transport limit are not even read: the socket is closed with 1009 (grizz/server.py).
WS_MAX_FRAME_BYTES = envint("WS_MAX_FRAME_BYTES", 256 * 1024, minimum=1024)
WS_TRANSPORT_MAX_BYTES = envint(
    "WS_TRANSPORT_MAX_BYTES", max(4 * WS_MAX_FRAME_BYTES, 1024 * 1024), minimum=WS_MAX_FRAME_BYTES
)
# The web server's TCP listen backlog: connections the kernel holds until daphne accepts them.
# Twisted's default (50) overflows when a web restart makes every browser reconnect at once,
# and each connection refused then waits a second or more for its SYN to be sent again.
# The kernel caps it at net.core.somaxconn (4096 on current Linux).
WEB_LISTEN_BACKLOG = envint("WEB_LISTEN_BACKLOG", 2048, minimum=1)
# Sockets with no frame from the client for this long, and no reply streaming to them, are
# closed with 4408. Browsers ping every 30 s.
WS_IDLE_TIMEOUT_SECONDS = envfloat("WS_IDLE_TIMEOUT_SECONDS", 300.0, minimum=1.0)
# Per user, across all their sockets and web processes: messages per window, and replies
# queued or being generated at once. 0 turns a limit off.
CHAT_RATE_LIMIT = envrate("CHAT_RATE_LIMIT", "20/min")
CHAT_MAX_INFLIGHT_PER_USER = envint("CHAT_MAX_INFLIGHT_PER_USER", 3)
CHAT_LIMITS_EXEMPT_STAFF = envbool("CHAT_LIMITS_EXEMPT_STAFF", False)
# Backpressure on the job queue (jobs admitted and not yet finished): from the first, new
# messages wait a little and are told their place; at the second, they are refused. Both
# are read in the admission script, so they hold across web processes and bursts.
LLM_SLOWDOWN_PENDING_JOBS = envint("LLM_SLOWDOWN_PENDING_JOBS", 3000, minimum=1)
LLM_MAX_PENDING_JOBS = envint("LLM_MAX_PENDING_JOBS", 5000, minimum=1)
# Staff and members of this group get high-priority replies; high jobs take at most this
# share of a worker's free slots while normal jobs wait.
CHAT_PRIORITY_GROUP = envstr("CHAT_PRIORITY_GROUP", "priority")
LLM_HIGH_PRIORITY_SHARE = envfloat("LLM_HIGH_PRIORITY_SHARE", 0.75)

# The LLM provider. Without an API key the worker streams from the built-in demo model.
OPENAI_API_KEY = envstr("OPENAI_API_KEY", "")
OPENAI_BASE_URL = envstr("OPENAI_BASE_URL", "") or None
LLM_MODEL = envstr("LLM_MODEL", "gpt-4o-mini")
# The models a conversation may name (its settings panel, PATCH /api/conversations/<id>/);
# one that names none gets LLM_MODEL. At most as long as Conversation.model holds.
LLM_MODELS = envnames("LLM_MODELS", [LLM_MODEL], longest=100)
if LLM_MODEL not in LLM_MODELS:
    # Refused rather than added: the list is what the operator offers, and a default the
    # list leaves out is more likely a typo in one of the two than a wish.
    raise ImproperlyConfigured(
        f"LLM_MODELS must include LLM_MODEL ({LLM_MODEL!r}), got {', '.join(LLM_MODELS)}"
    )
LLM_DEMO_MODEL = "grizz-demo"
LLM_REQUEST_TIMEOUT_SECONDS = envfloat("LLM_REQUEST_TIMEOUT_SECONDS", 60.0, minimum=1.0)
# How long a reply's deltas stay replayable in Redis after the reply has finished.
LLM_REPLAY_TTL_SECONDS = envint("LLM_REPLAY_TTL_SECONDS", 300, minimum=10)
# Under load a worker sends its frames to Redis at most once per this many milliseconds,
# many per round trip, and a reply's deltas within it go as one frame; after a quiet spell,
# and for a reply's first frame, at once. 0: a round as soon as the one before is answered.
LLM_FRAME_BATCH_MS = envint("LLM_FRAME_BATCH_MS", 5, minimum=0, maximum=30)
# While a worker is busy, a reply's deltas go at most this often, those that come within it
# as one frame (llmworker/replies.py, FrameEmitter); a reply's first delta never waits.
# 0: no window.
LLM_DELTA_WINDOW_MS = envint("LLM_DELTA_WINDOW_MS", 30, minimum=0, maximum=30)
LLM_WORKER_CONCURRENCY = envint("LLM_WORKER_CONCURRENCY", 512, minimum=1)
# Worker processes of one `run_llm_worker` (its --processes): more than one runs a
# supervisor that starts them, restarts those that die and stops them all on SIGTERM.
LLM_WORKER_PROCESSES = envint("LLM_WORKER_PROCESSES", 1, minimum=1)
# `run_llm_worker --autoscale MIN,MAX` (unset: a pool of a fixed size): the supervisor's pool
# follows the backlog between MIN and MAX processes, at most one step per cool-down.
LLM_WORKER_AUTOSCALE = envbounds("LLM_WORKER_AUTOSCALE")
LLM_WORKER_AUTOSCALE_COOLDOWN = envfloat("LLM_WORKER_AUTOSCALE_COOLDOWN", 30.0, minimum=0.0)
# A job whose worker has not renewed its lease for this long is taken over by another worker.
LLM_JOB_LEASE_SECONDS = envfloat("LLM_JOB_LEASE_SECONDS", 30.0, minimum=0.5)
# Deliveries of one job (worker crashes included) before it goes to the dead-letter stream.
LLM_MAX_ATTEMPTS = envint("LLM_MAX_ATTEMPTS", 3, minimum=1)
# How often replies left queued or streaming with no job in Redis are put back on the queue.
LLM_RECONCILE_SECONDS = envfloat("LLM_RECONCILE_SECONDS", 30.0, minimum=0.5)
# The chores (the reconciler above, dead consumers, dead letters) run on one worker at a time,
# the holder of a Redis lease of this many seconds, renewed every third of it: a holder that
# dies is replaced once its lease has run out, one that stops hands it over at once.
LLM_MAINTENANCE_LEASE_SECONDS = envfloat("LLM_MAINTENANCE_LEASE_SECONDS", 30.0, minimum=1.0)
# How often the holder removes dead consumers and trims the dead letters.
LLM_MAINTENANCE_SECONDS = envfloat("LLM_MAINTENANCE_SECONDS", 60.0, minimum=0.5)
# Consumers of the worker group idle this long with no job pending are removed. A live worker
# is never idle for more than its 5 s blocking read (or a third of LLM_JOB_LEASE_SECONDS, its
# lease renewal, while all its slots are busy), and one removed by mistake is only recreated
# by its next read; an hour keeps a dead worker visible in llm_status for a while.
LLM_CONSUMER_REMOVE_IDLE_SECONDS = envfloat(
    "LLM_CONSUMER_REMOVE_IDLE_SECONDS", 3600.0, minimum=10.0
)
# The dead-letter stream keeps at most this many entries, none older than this many days.
LLM_DEAD_LETTER_MAXLEN = envint("LLM_DEAD_LETTER_MAXLEN", 10000, minimum=1)
LLM_DEAD_LETTER_MAX_AGE_DAYS = envfloat("LLM_DEAD_LETTER_MAX_AGE_DAYS", 7.0, minimum=1.0)
# Retries of a retryable provider error (connection, timeout, 429, 5xx, a broken stream)
# within one delivery, with exponential backoff and jitter between these bounds.
LLM_RETRY_LIMIT = envint("LLM_RETRY_LIMIT", 4)
LLM_RETRY_BASE_SECONDS = envfloat("LLM_RETRY_BASE_SECONDS", 0.5, minimum=0.0)
LLM_RETRY_MAX_SECONDS = envfloat("LLM_RETRY_MAX_SECONDS", 30.0, minimum=0.0)
# The circuit breaker of each worker process, per provider base URL: this many consecutive
# retryable failures stop all calls to the provider for LLM_BREAKER_RESET_SECONDS, then one
# job probes it. Jobs wait meanwhile, without spending their retries.
LLM_BREAKER_FAILURES = envint("LLM_BREAKER_FAILURES", 5, minimum=1)
LLM_BREAKER_RESET_SECONDS = envfloat("LLM_BREAKER_RESET_SECONDS", 30.0, minimum=0.1)
# A reply whose provider sends nothing for this long, across its retries, fails with
# `timeout`. Longer than LLM_REQUEST_TIMEOUT_SECONDS leaves room to retry a stalled request.
LLM_RESULT_TIMEOUT_SECONDS = envfloat("LLM_RESULT_TIMEOUT_SECONDS", 120.0, minimum=0.1)
# After a conversation's first answer the worker asks the model for a short title (a small
# request of its own, after the reply is saved and acknowledged; docs/titles.md); off, or
# when it fails, the sidebar shows the first words of the first message. The request may
# take at most this long, the wait for a free title slot included.
LLM_TITLES = envbool("LLM_TITLES", True)
LLM_TITLE_TIMEOUT_SECONDS = envfloat("LLM_TITLE_TIMEOUT_SECONDS", 10.0, minimum=0.1)

# Metrics (grizz/metrics.py). The web's /metrics answers a request bearing this token
# (`Authorization: Bearer ...`), or a staff session; anyone else gets a 404. Empty: staff only.
METRICS_TOKEN = envstr("METRICS_TOKEN", "")
if METRICS_TOKEN and len(METRICS_TOKEN) < 16:
    raise ImproperlyConfigured("METRICS_TOKEN must be at least 16 characters (or empty)")
# The port of a worker's (or a supervised pool's) /metrics; 0: none. On 127.0.0.1 unless
# LLM_WORKER_METRICS_BIND says otherwise: the figures are for the operator's Prometheus only.
LLM_WORKER_METRICS_PORT = envint("LLM_WORKER_METRICS_PORT", 0, maximum=65535)
LLM_WORKER_METRICS_BIND = envstr("LLM_WORKER_METRICS_BIND", "127.0.0.1")
# How often each worker puts its figures (replies, tokens, breakers, slots) in Redis for
# llm_status; they expire after three periods without one.
LLM_WORKER_SNAPSHOT_SECONDS = envfloat("LLM_WORKER_SNAPSHOT_SECONDS", 5.0, minimum=0.5)

# Logs (docs/logging.md): one JSON object per line in production, for a log collector;
# plain lines for a person at a terminal (DJANGO_DEBUG=1, and `make run` sets text).
LOG_FORMAT = envchoice("LOG_FORMAT", "text" if DEBUG else "json", ("json", "text"))
# Messages, answers and the provider's own error text (which can quote the prompt) are
# personal data: kept out of the logs unless asked for, e.g. to debug one deployment.
LOG_CONTENT = envbool("LOG_CONTENT", False)
# dictConfig, then Python's warnings and uncaught exceptions as log lines in that format.
LOGGING_CONFIG = "grizz.logs.logging_configure"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        # The job's, reply's, conversation's and user's ids on every line (grizz/logs.py).
        "context": {"()": "grizz.logs.ContextFilter", "content": LOG_CONTENT},
    },
    "formatters": {
        # processName is the worker's consumer name in run_llm_worker: every line of a
        # job's log names the worker that ran it.
        "text": {"format": "%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s"},
        # python-json-logger: these fields, then every field of the context and the call's
        # `extra`. orjson's, which the worker already uses to read the provider's stream.
        "json": {
            "()": "pythonjsonlogger.orjson.OrjsonFormatter",
            "fmt": "%(levelname)s %(processName)s %(name)s %(message)s",
            "rename_fields": {"levelname": "level", "processName": "process", "name": "logger"},
            "timestamp": "time",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        },
    },
    "root": {"handlers": ["console"], "level": envstr("LOG_LEVEL", "INFO")},
    "loggers": {
        "django": {"level": "INFO"},
        # openai's HTTP client (httpx2) logs a line per request at INFO.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "openai": {"level": "WARNING"},
    },
}
