"""Consumer names that no two live workers of one host share, so that they can be stable.

A name of the group is its pending entries: a worker restarted under its old name reads its
unfinished jobs again at once, and two live workers under one name would read each other's.
So a worker claims its name before it reads: an exclusive flock(2) on a file of its own
(in the temporary directory, per user and per deployment: REDIS_URL and REDIS_KEY_PREFIX).
The kernel drops the lock when the last process holding the file dies, `kill -9` included,
so a restart never waits for a stale claim.

Without `--name` a worker takes the lowest free `<host>-<n>` (normally `<host>-0`); a pool's
supervisor takes the lowest P free names and holds them for its whole life, passing each
one's file down to the child of that slot (`GRIZZ_CONSUMER_LOCK_FD`): a slot restarted after
a crash finds its name still claimed, by its own supervisor, and an orphaned child (its
supervisor killed) keeps its name until it stops too.

The guard sees one host (one temporary directory): across hosts names differ by host name.
"""

import fcntl
import hashlib
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from django.conf import settings

LOCK_FD_ENV = "GRIZZ_CONSUMER_LOCK_FD"
MOST_NUMBERS = 1000


class NameInUse(Exception):
    pass


@dataclass(frozen=True)
class NameClaim:
    name: str
    fd: int  # open for as long as the name is ours


def host_name() -> str:
    return socket.gethostname()


def _claims_dir() -> Path:
    user_dir = Path(tempfile.gettempdir()) / f"grizz-consumers-{os.getuid()}"
    user_dir.mkdir(mode=0o700, exist_ok=True)
    found = os.lstat(user_dir)
    # In a shared temporary directory: another user's (or a link) could swap our claims.
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
        raise NameInUse(f"{user_dir} is not a directory of this user's; remove it")
    deployment = f"{settings.REDIS_URL}\0{settings.REDIS_KEY_PREFIX}".encode()
    path = user_dir / hashlib.sha256(deployment).hexdigest()[:16]
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _claim_path(name: str) -> Path:
    return _claims_dir() / f"{quote(name, safe='')}.lock"


def name_claim(name: str) -> NameClaim | None:
    """The name, if no live process holds it; None if one does."""
    fd = os.open(_claim_path(name), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for the message of whoever finds it taken
    return NameClaim(name, fd)


def name_holder(name: str) -> str:
    try:
        return _claim_path(name).read_text().strip() or "?"
    except OSError:
        return "?"


def names_claim_free(base: str, count: int) -> list[NameClaim]:
    """The `count` lowest free names `<base>-<n>`."""
    claims: list[NameClaim] = []
    for number in range(MOST_NUMBERS):
        claim = name_claim(f"{base}-{number}")
        if claim is not None:
            claims.append(claim)
            if len(claims) == count:
                return claims
    for claim in claims:
        os.close(claim.fd)
    raise NameInUse(f"no {count} free consumer names {base}-<n> on this host")


def name_inherited(name: str) -> NameClaim | None:
    """The claim of `name` that the supervisor passed down, if it did."""
    value = os.environ.get(LOCK_FD_ENV)
    if not value:
        return None
    fd = int(value)
    try:
        same_file = os.fstat(fd).st_ino == _claim_path(name).stat().st_ino
        if same_file:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: a no-op
    except OSError:
        same_file = False
    if not same_file:
        raise NameInUse(f"{LOCK_FD_ENV}={value} is not the claim of consumer name {name}")
    return NameClaim(name, fd)


def consumer_name_claim(requested: str | None) -> NameClaim:
    """The name one worker process runs under: its supervisor's claim, the `--name`
    requested (refused if a live process holds it) or the lowest free `<host>-<n>`."""
    if requested is None:
        return names_claim_free(host_name(), 1)[0]
    claim = name_inherited(requested) or name_claim(requested)
    if claim is None:
        raise NameInUse(
            f"consumer name {requested} is in use by process {name_holder(requested)} on this "
            "host; two workers under one name would read each other's jobs"
        )
    return claim
