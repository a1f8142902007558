"""A mypy plugin that only sets the environment. The Django plugin imports grizz.settings,
which refuses to load without DJANGO_SECRET_KEY (unless DJANGO_DEBUG is on): this gives it
a key, so that a bare `mypy` works as `make lint` does. Listed first in pyproject.toml, it is
loaded before the Django plugin. The key exists only inside the mypy process."""

import os

from mypy.plugin import Plugin

os.environ.setdefault("DJANGO_SECRET_KEY", "grizz-mypy-only-not-a-secret-0123456789")


def plugin(version: str) -> type[Plugin]:
    return Plugin
