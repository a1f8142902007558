"""A pytest plugin (`-p tests.support.clean_env`, in pyproject's addopts), imported before
Django reads its settings: a developer's exported Grizz settings (`LLM_RETRY_LIMIT`,
`CHAT_RATE_LIMIT`, `GRIZZ_FAULTS`...) must not change what a test sees.

What `make test` sets on purpose stays: where the database and Redis are, the secret key, the
debug flag, and the settings module."""

import os

KEPT = {"DATABASE_URL", "REDIS_URL", "DJANGO_SECRET_KEY", "DJANGO_DEBUG", "DJANGO_SETTINGS_MODULE"}
# Every prefix of a variable grizz/settings.py or llmworker/faults.py reads.
GRIZZ_PREFIXES: tuple[str, ...] = (
    "CHAT_",
    "DATABASE_",
    "DJANGO_",
    "GRIZZ_",
    "JWT_",
    "LLM_",
    "LOG_",
    "METRICS_",
)
GRIZZ_PREFIXES += ("OPENAI_", "REDIS_", "WS_")


def grizz_setting(name: str) -> bool:
    return name.startswith(GRIZZ_PREFIXES)


for _name in [name for name in os.environ if grizz_setting(name) and name not in KEPT]:
    del os.environ[_name]
