"""The request plumbing every page shares: who is logged in, CSRF, permission, rendering.

A request is refused, in this order: not logged in (a page redirects to the login, anything
else is 401/403), a state-changing request without the session's CSRF token (403), a role
that may not do it (403). Errors are rendered as a page with their message (a database or
Kafka down), never as a stack trace.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from console.auth import csrf_ok, may, new_csrf_token
from cutover.config import ConsoleUser, Settings
from cutover.errors import CutoverError, redact_dsn

__all__ = ["Denied", "Env", "Web", "current_user", "require"]

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class Denied(HTTPException):
    """A refused request (401/403/429): rendered as a short page, the reason in it."""


@dataclass(frozen=True, slots=True)
class Env:
    """What the pages need besides the request (built once by :func:`console.app.create_app`)."""

    settings: Settings
    weights: Mapping[str, int]
    #: ``list(settings, status | None)`` and ``retry(settings, id | None)`` of the dead-letter
    #: store, as ``cutover dlq`` calls them (passed in by the CLI, which owns that wiring).
    list_letters: Callable[[Settings, str | None], list[Any]]
    retry_letters: Callable[[Settings, int | None], Any]

    @property
    def domains(self) -> list[str]:
        return list(self.weights)


def csrf_token(request: Request) -> str:
    """This session's CSRF token (made on first use)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = new_csrf_token()
        request.session["csrf"] = token
    return token


def current_user(request: Request, settings: Settings) -> ConsoleUser | None:
    """The logged-in user, looked up in the config on every request (a user removed from the
    config and the console restarted is logged out)."""
    name = request.session.get("user")
    return next((u for u in settings.console.users if u.name == name), None)


async def require(
    request: Request, settings: Settings, action: str = "view"
) -> tuple[ConsoleUser, FormData | None]:
    """The user, if logged in and allowed ``action``; a POST's form, its CSRF token checked."""
    user = current_user(request, settings)
    if user is None:
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            raise Denied(303, headers={"location": "/login"})
        raise Denied(401 if request.method == "GET" else 403, "log in first")
    form = None
    if request.method == "POST":
        form = await request.form()
        sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
        if not csrf_ok(request.session.get("csrf"), sent if isinstance(sent, str) else None):
            raise Denied(403, "missing or wrong CSRF token: reload the page and try again")
    if not may(user.role, action):
        raise Denied(403, f"{user.name} is a {user.role}: {action} needs an operator")
    return user, form


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any],
    status_code: int = 200,
    *,
    settings: Settings | None = None,
) -> Response:
    user = None if settings is None else current_user(request, settings)
    return TEMPLATES.TemplateResponse(
        request,
        template,
        {
            "user": user,
            "operator": user is not None and may(user.role, "switch-reads"),
            "csrf": csrf_token(request),
            **context,
        },
        status_code=status_code,
    )


def error_message(exc: BaseException) -> str:
    """What a page says about a failure: our errors' messages (secrets masked), else its type."""
    if isinstance(exc, CutoverError):
        return redact_dsn(exc.message)
    return f"internal error ({type(exc).__name__}); the console log has the details"


Handler = Callable[[Request], Awaitable[Response]]


class Web:
    """Route helpers bound to one :class:`Env`."""

    def __init__(self, env: Env) -> None:
        self.env = env

    def page(self, request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        return render(request, template, ctx, status, settings=self.env.settings)

    def error_page(self, request: Request, exc: BaseException, status: int = 503) -> Response:
        return self.page(request, "error.html", status, message=error_message(exc))
