"""Who may use the console, CSRF tokens and the security headers of its responses.

Rules (checked on every console request, in this order):

- ``ORDERFLOW_ADMIN_TOKEN`` set: a request must carry it, as ``Authorization: Bearer``
  or as the session cookie the login form sets (an HMAC of the token, never the token).
- not set: the console serves loopback only. It refuses when the API is configured
  beyond loopback (``Settings.api_host``), when the request came through a non-loopback
  address or from a non-loopback client, and when the ``Host`` header is not a
  loopback name (which defeats DNS rebinding, the one way a web page elsewhere could
  reach a console on 127.0.0.1).

State-changing requests are POSTs carrying a CSRF token equal to the ``orderflow_csrf``
cookie (double submit; the cookie is SameSite=Strict), and, when the browser sends an
``Origin``, that origin must be this host.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from orderflow.config import Settings

CSRF_COOKIE = "orderflow_csrf"
CSRF_FIELD = "csrf_token"
SESSION_COOKIE = "orderflow_console"
#: Shortest admin token accepted: a short one could be guessed through the login form.
MIN_TOKEN_LENGTH = 16

_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]{32,128}")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})

#: Console pages: only our own script and style, no framing of the console itself.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
#: An email's HTML part: no script, no network (no tracking pixels), framed by us only.
EMAIL_CSP = (
    "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "font-src data:; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name localhost (a host, no port)."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_of(netloc: str) -> str:
    """The host part of ``host[:port]`` or ``[v6]:port``."""
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the console will not serve a request: HTTP status, title and what to do."""

    status: int
    title: str
    detail: str
    #: True when logging in with the admin token would help.
    login: bool = False


class ConsoleGuard:
    """Applies the access rules above to requests, for one app's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        self._token = token
        self._session = (
            hmac.new(token.encode(), b"orderflow-console-session-v1", hashlib.sha256).hexdigest()
            if token
            else None
        )

    @property
    def token_required(self) -> bool:
        """True when ``ORDERFLOW_ADMIN_TOKEN`` is set."""
        return self._token is not None

    def configuration_refusal(self) -> Refusal | None:
        """Why the console is off whatever the request, or None (checked at start too)."""
        if self._token is not None:
            if len(self._token) < MIN_TOKEN_LENGTH:
                return Refusal(
                    503,
                    "The console is off: the admin token is too short",
                    f"ORDERFLOW_ADMIN_TOKEN must be at least {MIN_TOKEN_LENGTH} characters "
                    "(use a long random secret, e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'`) and restart.",
                )
            return None
        if not is_loopback_host(self.settings.api_host):
            return Refusal(
                403,
                "The console is off: the API listens beyond loopback",
                f"The API is bound to {self.settings.api_host}, so anyone on the network "
                "could use the console. Set ORDERFLOW_ADMIN_TOKEN to a long random secret "
                "and restart, or bind the API to 127.0.0.1.",
            )
        return None

    def refusal(self, request: Request) -> Refusal | None:
        """Why this request may not use the console, or None when it may."""
        refused = self.configuration_refusal()
        if refused is not None:
            return refused
        if self._token is not None:
            if self.authenticated(request):
                return None
            return Refusal(
                401,
                "Log in to the console",
                "This console needs the admin token (ORDERFLOW_ADMIN_TOKEN).",
                login=True,
            )
        server = request.scope.get("server")
        client = request.client
        if (server and not is_loopback_host(str(server[0]))) or (
            client is not None and not is_loopback_host(client.host)
        ):
            return Refusal(
                403,
                "The console is off for remote clients",
                "Without ORDERFLOW_ADMIN_TOKEN the console serves loopback only. "
                "Set ORDERFLOW_ADMIN_TOKEN to a long random secret and restart to use "
                "it from another machine.",
            )
        host = _host_of(request.headers.get("host", ""))
        if not is_loopback_host(host):
            return Refusal(
                403,
                "The console is off for this host name",
                f"Without ORDERFLOW_ADMIN_TOKEN the console answers only to localhost, "
                f"127.0.0.1 or [::1], not {host!r}. Set ORDERFLOW_ADMIN_TOKEN to serve it "
                "under another name.",
            )
        return None

    def authenticated(self, request: Request) -> bool:
        """True when the request carries the admin token or the session cookie."""
        if self._token is None or self._session is None:
            return False
        authorization = request.headers.get("authorization", "")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() == "bearer" and given:
            return hmac.compare_digest(given.strip().encode(), self._token.encode())
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self._session.encode())

    def check_token(self, given: str) -> bool:
        """True when ``given`` is the admin token (constant time)."""
        if self._token is None:
            return False
        return hmac.compare_digest(given.encode(), self._token.encode())

    def set_session(self, request: Request, response: Response) -> None:
        """Remember a successful login in an HttpOnly, SameSite=Strict cookie."""
        assert self._session is not None
        response.set_cookie(
            SESSION_COOKIE,
            self._session,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )


def csrf_token(request: Request) -> tuple[str, bool]:
    """The request's CSRF token, and True when it is new (so the cookie must be set)."""
    current = request.cookies.get(CSRF_COOKIE, "")
    if _TOKEN_TEXT.fullmatch(current):
        return current, False
    return secrets.token_urlsafe(32), True


def set_csrf_cookie(request: Request, response: Response, token: str) -> None:
    """Set the double-submit cookie (HttpOnly: only forms carry the token)."""
    response.set_cookie(
        CSRF_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def csrf_failure(request: Request, submitted: str | None) -> str | None:
    """Why a state-changing request fails the CSRF check, or None when it passes."""
    # Browsers say where a request came from; our pages send no referrer, so their
    # forms carry ``Origin: null``, which proves nothing either way (the token decides).
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"the request came from another site (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        expected = request.headers.get("host", "")
        if urlsplit(origin).netloc.lower() != expected.lower():
            return f"the request came from another origin ({origin})"
    cookie = request.cookies.get(CSRF_COOKIE)
    if not cookie:
        return "the CSRF cookie is missing (are cookies enabled?)"
    if not submitted:
        return "the form carries no CSRF token"
    if not hmac.compare_digest(cookie.encode(), submitted.encode()):
        return "the CSRF token does not match"
    return None


def secure_headers(response: Response, *, csp: str = PAGE_CSP, framing: str = "DENY") -> Response:
    """Add the console's security headers to ``response`` and return it."""
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Frame-Options"] = framing
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response
