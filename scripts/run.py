"""`make run`: set up and start Grizz locally (web + worker from the Procfile, via honcho).

honcho stops every process when one exits; the Procfile's worker is a supervisor that
restarts a crashed worker process itself, so that one crash does not stop the web.

Uses the Redis at REDIS_URL, or starts a private redis-server when none answers; without
OPENAI_API_KEY the worker streams from the built-in demo model.
"""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"
BIN = Path(sys.executable).parent
DEMO_USER = "demo"


def main() -> None:
    VAR.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("DJANGO_SECRET_KEY", _persistent_secret("secret_key"))
    env.setdefault("DJANGO_DEBUG", "0")
    env.setdefault("LOG_FORMAT", "text")  # a person reads these lines, not a log collector
    env.setdefault("PORT", "8000")
    env.setdefault("BIND", "127.0.0.1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    redis_server = _redis_ensure(env)
    try:
        _manage(env, "migrate", "--noinput", "-v0")
        _manage(env, "collectstatic", "--noinput", "-v0")
        password = _demo_user_ensure(env)
        _announce(env, password)
        subprocess.run([str(BIN / "honcho"), "start", "web", "worker"], cwd=ROOT, env=env)
    except KeyboardInterrupt:
        pass
    finally:
        if redis_server is not None:
            redis_server.terminate()


def _persistent_secret(name: str, *, length: int = 40) -> str:
    path = VAR / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(length))
        path.chmod(0o600)
    return path.read_text().strip()


def _redis_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _redis_ensure(env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    url = env.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_answers(url):
        return None
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit(
            f"No Redis answers at {url} and redis-server is not installed.\n"
            "Install it (Debian/Ubuntu: apt install redis-server; macOS: brew install redis),\n"
            "or set REDIS_URL to a Redis you run, then `make run` again."
        )
    port = _free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(VAR), "--save", "60 1"],
        stdout=subprocess.DEVNULL,
    )
    env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _redis_answers(env["REDIS_URL"]):  # a new server needs a moment to listen
        if time.monotonic() > deadline or server.poll() is not None:
            sys.exit("The private redis-server did not start; see its output above.")
        time.sleep(0.1)
    print(f"Started a private redis-server on port {port} (data in var/).")
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


def _demo_user_ensure(env: dict[str, str]) -> str:
    password = _persistent_secret("demo_password", length=12)
    _manage(
        env,
        "shell",
        "-c",
        "from django.contrib.auth.models import User\n"
        f"user, _ = User.objects.get_or_create(username={DEMO_USER!r})\n"
        f"user.set_password({password!r})\n"
        "user.is_staff = user.is_superuser = True\n"
        "user.save()\n",
    )
    return password


def _announce(env: dict[str, str], password: str) -> None:
    model = "a real model" if env.get("OPENAI_API_KEY") else "the demo model (no OPENAI_API_KEY)"
    print(
        f"\nGrizz is starting on http://127.0.0.1:{env['PORT']}/ with {model}.\n"
        f"Sign in as {DEMO_USER!r} with password {password!r} (also admin at /admin/).\n"
        "Stop with Ctrl-C.\n",
        flush=True,
    )


if __name__ == "__main__":
    main()
