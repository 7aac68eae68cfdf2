"""Streamable HTTP transport with a bearer token.

- Every request must carry ``Authorization: Bearer <token>``; the token comes from
  ``ES_MERGING_TOKEN`` (or ``Settings.token``) and is compared in constant time
  (``hmac.compare_digest``). A missing or wrong token gets 401 with ``WWW-Authenticate: Bearer``.
- Without a token the HTTP transport refuses to start (:class:`HttpConfigError`).
- Binds 127.0.0.1 by default and keeps the SDK's DNS-rebinding protection on: only the Host and
  Origin values of the bind address and localhost (plus ``ES_MERGING_ALLOWED_HOSTS``) pass.
- The server state (store, jobs) is opened once for the app's lifetime, so jobs outlive sessions.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from server.settings import Settings

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16


class HttpConfigError(RuntimeError):
    """The HTTP transport cannot start with these settings (no token, weak token...)."""


class BearerTokenMiddleware:
    """Pure ASGI middleware: HTTP requests need the bearer token; lifespan passes through."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self._expected = token.encode()

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for key, value in scope.get("headers") or ():
            if key.lower() == b"authorization":
                header = value
                break
        scheme, _, given = header.partition(b" ")
        # compare even when the scheme is wrong, so timing does not reveal which part failed
        ok = hmac.compare_digest(given.strip(), self._expected)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._authorized(scope):
            body = json.dumps({"error": "unauthorized",
                               "message": "send Authorization: Bearer <token> (the server's ES_MERGING_TOKEN)"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"www-authenticate", b'Bearer realm="es-merging"'),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["type"] == "websocket":  # not served
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)


def transport_security(settings: Settings) -> TransportSecuritySettings:
    host = settings.host
    hosts = {"127.0.0.1:*", "localhost:*", "[::1]:*"}
    origins = {"http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"}
    if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        shown = f"[{host}]" if ":" in host else host
        hosts.add(f"{shown}:*")
        origins.add(f"http://{shown}:*")
    for extra in settings.allowed_hosts:
        hosts.add(extra if ":" in extra else f"{extra}:*")
        origins.add(f"http://{extra}" if ":" in extra else f"http://{extra}:*")
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=sorted(hosts),
                                     allowed_origins=sorted(origins))


def require_token(settings: Settings) -> str:
    token = settings.token
    if not token:
        raise HttpConfigError(
            "the HTTP transport needs a bearer token: set ES_MERGING_TOKEN (e.g. "
            "`export ES_MERGING_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`) "
            "and send `Authorization: Bearer $ES_MERGING_TOKEN`; or use --transport stdio"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise HttpConfigError(f"ES_MERGING_TOKEN is too short ({len(token)} characters); use at least {MIN_TOKEN_LENGTH}")
    return token


def build_http_app(server: MCPServer, settings: Settings, *, path: str = "/mcp") -> ASGIApp:
    """The ASGI app (token check outside, DNS-rebinding protection inside). Raises HttpConfigError."""
    token = require_token(settings)
    inner = server.streamable_http_app(streamable_http_path=path, transport_security=transport_security(settings),
                                       host=settings.host)
    state = getattr(server, "state", None)
    inner_lifespan = inner.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        import anyio.to_thread

        if state is not None:  # hold the state open for the app's lifetime: jobs outlive sessions
            await anyio.to_thread.run_sync(state.open)
        try:
            async with inner_lifespan(app):
                yield
        finally:
            if state is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(state.close)

    inner.router.lifespan_context = lifespan
    return BearerTokenMiddleware(inner, token)


def run_http(server: MCPServer, settings: Settings) -> None:
    import uvicorn

    app = build_http_app(server, settings)
    log.info("es-merging MCP over streamable HTTP at http://%s:%d/mcp (bearer token required)",
             settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                lifespan="on")
