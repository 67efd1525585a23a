"""One gate for every route when `api_token` is set: the JSON API, /outputs, and the whole mounted
Gradio side (page, assets, /gradio_api/* with its queue, file and upload routes). A request passes
with `Authorization: Bearer <api_token>` (scripts, gradio_client) or with the UI's session cookie,
which the small login page at /login sets from the same token. Public: the probes and /metrics
and the favicon (PUBLIC_PATHS). /admin/* is the monitor's, behind its own admin token (app.web.api).

Why an ASGI middleware and not a route dependency: a dependency covers the routes it is attached to,
and Gradio adds dozens of its own; a gate in front of the router covers every route, including one
added later (tests/app/test_routes_inventory.py walks them all)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
from typing import Awaitable, Callable, Optional
from urllib.parse import parse_qs, quote, urlsplit

log = logging.getLogger("app.web.auth")

# /favicon.ico: Gradio's icon, which a browser asks for on the login page itself.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/login", "/logout", "/favicon.ico"})
OWN_AUTH_PREFIXES = ("/admin/",)  # routes that check a stronger token themselves
COOKIE = "zimage_session"
FAILED_LOGIN_DELAY_S = 0.5  # slows a guessing loop; a real user mistypes once

Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def session_value(api_token: str) -> str:
    """The cookie's value: derived from the token, so rotating the token ends every session, and the
    token itself never travels in a cookie."""
    return hmac.new(api_token.encode(), b"zimage-serve ui session v1", hashlib.sha256).hexdigest()


def tokens_match(supplied: str, expected: str) -> bool:
    """Constant-time comparison: the time taken says nothing about how much of a guess was right."""
    return hmac.compare_digest(supplied.encode(), expected.encode())


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer <token>` header value; "" for anything else."""
    return authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def safe_next(target: str) -> str:
    """Where to go after logging in: a path on this server only (no //evil.example, no scheme)."""
    parts = urlsplit(target)
    if (
        not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or parts.scheme
        or parts.netloc
    ):
        return "/"
    return target


class TokenGate:
    def __init__(self, app, api_token: str, secure_cookie: bool = False):
        self.app = app
        self.api_token = api_token
        self.session = session_value(api_token)
        self.secure_cookie = secure_cookie

    def authorized(self, headers: dict[str, str]) -> bool:
        if tokens_match(bearer_token(headers.get("authorization", "")), self.api_token):
            return True
        return tokens_match(_cookie(headers.get("cookie", ""), COOKIE), self.session)

    async def __call__(self, scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = _headers(scope)
        if scope["type"] == "http" and path == "/login":
            await self._login(scope, receive, send, headers)
            return
        if scope["type"] == "http" and path == "/logout":
            await _respond(send, 303, b"", [(b"location", b"/login"), self._cookie_header("", 0)])
            return
        if path in PUBLIC_PATHS or path.startswith(OWN_AUTH_PREFIXES) or self.authorized(headers):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope.get("method") == "GET" and "text/html" in headers.get("accept", ""):
            target = path + (
                "?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else ""
            )
            await _respond(
                send, 303, b"", [(b"location", ("/login?next=" + quote(target, safe="")).encode())]
            )
            return
        body = (
            b'{"error": "unauthorized", "message": "missing or wrong API token: send Authorization: '
            b'Bearer <token>, or log in at /login for the UI"}'
        )
        await _respond(
            send, 401, body, [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        )

    def _cookie_header(self, value: str, max_age: Optional[int]) -> tuple[bytes, bytes]:
        # HttpOnly: page scripts cannot read it; SameSite=Strict: another site's form cannot ride on it.
        cookie = f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict"
        if max_age is not None:
            cookie += f"; Max-Age={max_age}"
        if self.secure_cookie:
            cookie += "; Secure"
        return b"set-cookie", cookie.encode()

    async def _login(self, scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope.get("method") == "GET":
            next_path = safe_next(query.get("next", ["/"])[0])
            await _respond(send, 200, login_page(next_path), [(b"content-type", b"text/html; charset=utf-8")])
            return
        if scope.get("method") != "POST":
            await _respond(
                send,
                405,
                b'{"error": "method_not_allowed", "message": "GET or POST /login"}',
                [(b"content-type", b"application/json"), (b"allow", b"GET, POST")],
            )
            return
        raw = b""
        while True:  # the body limit in front of this gate bounds what can arrive here
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        form = parse_qs(raw.decode("utf-8", "replace"))
        next_path = safe_next(form.get("next", ["/"])[0])
        if tokens_match(form.get("token", [""])[0].strip(), self.api_token):
            log.info("ui login", extra={"event": "login", "ok": True})
            await _respond(
                send,
                303,
                b"",
                [(b"location", next_path.encode()), self._cookie_header(self.session, 7 * 24 * 3600)],
            )
            return
        log.warning("ui login refused", extra={"event": "login", "ok": False})
        await asyncio.sleep(FAILED_LOGIN_DELAY_S)
        await _respond(
            send,
            401,
            login_page(next_path, "That token is not right."),
            [(b"content-type", b"text/html; charset=utf-8")],
        )


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = headers + [(b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def login_page(next_path: str, error: str = "") -> bytes:
    """A self-contained page (no script, no asset behind the gate): a token field and a button."""
    message = f'<p class="err" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Log in · zimage-serve</title>
<style>
body {{font-family: system-ui, sans-serif; background: #f5f5f7; display: grid; place-items: center;
       min-height: 100vh; margin: 0;}}
form {{background: #fff; padding: 28px 32px; border-radius: 12px; box-shadow: 0 2px 12px #0002;
       width: 320px;}}
h1 {{font-size: 1.2em; margin: 0 0 16px;}}
input[type=password] {{width: 100%; box-sizing: border-box; padding: 8px; font-size: 1em;
                        margin: 6px 0 14px;}}
button {{width: 100%; padding: 9px; font-size: 1em; background: #4f46e5; color: #fff; border: 0;
        border-radius: 8px; cursor: pointer;}}
.err {{color: #b91c1c;}}
</style></head>
<body><form method="post" action="/login">
<h1>Z-Image-Turbo · zimage-serve</h1>{message}
<input type="text" name="username" value="zimage-serve" autocomplete="username" hidden>
<label for="token">Access token</label>
<input type="password" id="token" name="token" autocomplete="current-password" autofocus required>
<input type="hidden" name="next" value="{html.escape(next_path, quote=True)}">
<button type="submit" id="login">Log in</button>
</form></body></html>""".encode()
