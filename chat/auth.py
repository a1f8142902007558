"""WebSocket authentication: a simplejwt access token (as the subprotocol `jwt.<token>`, or
`?token=`), else the session cookie.

The session cookie is honoured only from a page of our own origin: a page elsewhere could
otherwise open a socket as the signed-in user (cross-site WebSocket hijacking).
"""

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

from asgiref.typing import ASGI3Application, ASGIReceiveCallable, ASGISendCallable
from channels.auth import get_user
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import DatabaseError
from django.http import parse_cookie
from django.http.request import validate_host
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import InvalidToken, TokenError
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.tokens import BlacklistMixin, Token
from rest_framework_simplejwt.utils import get_md5_hash_password

from grizz.database import database_call

if TYPE_CHECKING:
    from channels.consumer import _ChannelScope

# Set in the scope when the session's user could not be looked up because the database is
# down: the consumer then closes with "try again later" rather than daphne failing the
# handshake (500).
DATABASE_DOWN = "grizz.database_down"
# The socket's SocketIdentity, or None when it gave no credentials that hold.
IDENTITY = "grizz.identity"


@dataclass(frozen=True)
class SocketIdentity:
    """Who a socket's credentials say its user is. The consumer loads that user together
    with the conversation, in one query (chat/services.py), and asks `accepts` before
    trusting them: a token's user is read once, not once here and once there."""

    user_id: int
    token: Token | None = None  # the validated token, when the socket gave one

    def accepts(self, user: User) -> bool:
        # The session's user passed its backend's checks when it was read; a token's gets
        # simplejwt's (JWTAuthentication.get_user's, after its lookup), with its settings.
        if self.token is None:
            return True
        if api_settings.CHECK_USER_IS_ACTIVE and not user.is_active:
            return False
        return not api_settings.CHECK_REVOKE_TOKEN or self.token.get(
            api_settings.REVOKE_TOKEN_CLAIM
        ) == get_md5_hash_password(user.password)


if User._meta.pk.attname != api_settings.USER_ID_FIELD:
    raise ImproperlyConfigured("chat sockets look a token's user up by primary key")
_user_pk = User._meta.pk.to_python


def token_identity(raw_token: str) -> SocketIdentity | None:
    """simplejwt's validation of an access token (signature, expiry, type, its configured
    token classes), without its user lookup."""
    try:
        token = JWTAuthentication().get_validated_token(raw_token.encode())
        user_id = _user_pk(token[api_settings.USER_ID_CLAIM])
    except (InvalidToken, TokenError, KeyError, ValidationError):
        return None
    return None if user_id is None else SocketIdentity(user_id, token)


# Only a blacklisting token class (a refresh or sliding token, with simplejwt's blacklist
# app installed) reads the database to validate a token; other tokens are checked on the
# event loop, without a database call of their own.
_token_check_reads_database = "rest_framework_simplejwt.token_blacklist" in (
    settings.INSTALLED_APPS
) and any(issubclass(cls, BlacklistMixin) for cls in api_settings.AUTH_TOKEN_CLASSES)


_token_identity_on_database = database_call(token_identity)


async def identity_from_token(raw_token: str) -> SocketIdentity | None:
    if _token_check_reads_database:
        return await _token_identity_on_database(raw_token)
    return token_identity(raw_token)


def _header(scope: "_ChannelScope", name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def origin_is_trusted(scope: "_ChannelScope") -> bool:
    origin = _header(scope, b"origin")
    if origin is None:
        return False  # browsers always send Origin on WebSockets; others must use a token
    origin_host = urlsplit(origin).netloc
    host = _header(scope, b"host")
    if host is not None and origin_host == host:
        return True
    trusted = [urlsplit(o).netloc for o in settings.CSRF_TRUSTED_ORIGINS]
    return origin_host in trusted or validate_host(
        origin_host.split(":")[0], settings.ALLOWED_HOSTS
    )


def _token_from_query(scope: "_ChannelScope") -> str | None:
    tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return tokens[0] if tokens else None


def _token_from_subprotocols(scope: "_ChannelScope") -> str | None:
    # Keeps the token out of URLs and access logs: Sec-WebSocket-Protocol: grizz, jwt.<token>
    for protocol in scope.get("subprotocols", []):
        if protocol.startswith("jwt."):
            return protocol.removeprefix("jwt.")
    return None


async def identity_from_session(scope: "_ChannelScope") -> SocketIdentity | None:
    session_key = _session_key(scope)
    if session_key is None:
        return None
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    # Channels' lookup (the session's user, checked against its auth hash), given only the
    # session: the socket's scope needs neither it nor the cookies once the user is known.
    user = await get_user({"session": session})  # type: ignore[typeddict-item]
    return SocketIdentity(user.pk) if user.is_authenticated else None


def _session_key(scope: "_ChannelScope") -> str | None:
    cookie_header = _header(scope, b"cookie")
    return parse_cookie(cookie_header).get(settings.SESSION_COOKIE_NAME) if cookie_header else None


class SocketAuthMiddleware:
    """Puts who the socket's user is in scope[IDENTITY]: the token's when one is given,
    else the session's when the socket comes from a page of our own origin, else None. A
    database that is down leaves the socket without one and marked DATABASE_DOWN, instead
    of daphne failing the handshake.

    One layer in place of Channels' AuthMiddlewareStack (cookies, session, user): each of its
    layers copied the scope and stayed suspended in the socket's task for the socket's life,
    with the cookies and the session in the scope they kept, about 3 KiB of an idle socket.
    Its session layer also wrapped every send to save a changed session, and a chat socket
    never changes it (4 % of the web's CPU while replies streamed, bench profile)."""

    def __init__(self, inner: ASGI3Application) -> None:
        self.inner = inner

    async def __call__(
        self, scope: "_ChannelScope", receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        try:
            extra: dict[str, Any] = {IDENTITY: await self._identity(scope)}
        except DatabaseError:
            extra = {IDENTITY: None, DATABASE_DOWN: True}
        # A copy, as ASGI asks of a middleware; the stubs' scope is a TypedDict without room
        # for keys of our own.
        await self.inner(cast("_ChannelScope", {**scope, **extra}), receive, send)

    async def _identity(self, scope: "_ChannelScope") -> SocketIdentity | None:
        token = _token_from_subprotocols(scope) or _token_from_query(scope)
        if token is not None:
            return await identity_from_token(token)
        if not origin_is_trusted(scope):
            return None
        return await identity_from_session(scope)
