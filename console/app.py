"""The console's ASGI application (Starlette): login, the live overview, the JSON and
server-sent-event feeds behind it. The actions, audit and dead-letter pages are
:mod:`console.actions`; the request checks :mod:`console.web`; the readers :mod:`console.live`.

Sessions are Starlette's signed cookies (itsdangerous): HttpOnly, SameSite=Strict, ``Secure``
when the console is served behind TLS (``https_only``). They hold the user name and the CSRF
token, nothing else; the role is looked up in the config on every request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from console import actions
from console.auth import LoginLimiter, authenticate, csrf_ok
from console.live import Collector
from console.web import CSRF_FIELD, HERE, Env, Web, csrf_token, require
from cutover.logging import get_logger

__all__ = ["create_app"]

log = get_logger("console.app")

#: How often the event stream looks for a new reading (the readers refresh every second).
STREAM_POLL_S = 0.25


class Console(Web):
    """The login and overview routes."""

    def __init__(self, env: Env, collector: Collector) -> None:
        super().__init__(env)
        self.collector = collector
        console = env.settings.console
        self.limiter = LoginLimiter(console.max_failed_logins, console.failed_login_window_s)

    async def login_form(self, request: Request) -> Response:
        return self.page(request, "login.html", error=None)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        sent = form.get(CSRF_FIELD)
        if not csrf_ok(request.session.get("csrf"), sent if isinstance(sent, str) else None):
            return self.page(request, "login.html", 403, error="the form expired: try again")
        address = request.client.host if request.client else "unknown"
        if self.limiter.blocked(name, address):
            wait = self.limiter.retry_after_s(name, address)
            log.warning("console.login_limited", user=name, address=address)
            response = self.page(
                request, "login.html", 429, error=f"too many failed logins: wait {wait} s"
            )
            response.headers["retry-after"] = str(wait)
            return response
        # argon2 is deliberately slow: off the event loop.
        user = await run_in_threadpool(
            authenticate, self.env.settings.console.users, name, password
        )
        if user is None:
            self.limiter.failed(name, address)
            log.info("console.login_failed", user=name, address=address)
            return self.page(request, "login.html", 401, error="wrong user name or password")
        self.limiter.succeeded(name)
        request.session.clear()  # a new session: nothing from before the login carries over
        request.session["user"] = user.name
        csrf_token(request)
        log.info("console.login", user=user.name, role=user.role)
        return RedirectResponse("/", status_code=303)

    async def logout(self, request: Request) -> Response:
        await require(request, self.env.settings)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def overview(self, request: Request) -> Response:
        await require(request, self.env.settings)
        return self.page(
            request,
            "overview.html",
            o=self.collector.overview(),
            domains=self.env.domains,
            commands=actions.COMMANDS,
        )

    async def overview_json(self, request: Request) -> Response:
        await require(request, self.env.settings)
        return JSONResponse(self.collector.overview())

    async def samples_json(self, request: Request) -> Response:
        await require(request, self.env.settings)
        return JSONResponse(self.collector.samples())

    async def events(self, request: Request) -> Response:
        """Server-sent events: the overview (rendered) and a chart sample at each new reading."""
        user, _ = await require(request, self.env.settings)

        async def stream() -> AsyncIterator[str]:
            seen = -1
            while not await request.is_disconnected():
                if self.collector.version != seen:
                    seen = self.collector.version
                    yield f"data: {json.dumps(self._event(request), default=str)}\n\n"
                await asyncio.sleep(STREAM_POLL_S)

        log.debug("console.stream", user=user.name)
        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-store"}
        )

    def _event(self, request: Request) -> dict[str, Any]:
        overview = self.collector.overview()
        samples = self.collector.samples()
        html = self.page(request, "_live.html", o=overview).body
        return {
            "html": bytes(html).decode(),
            "sample": samples[-1] if samples else None,
            "taken_at": overview["taken_at"],
        }


def _denied(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 303:
        return RedirectResponse(exc.headers["location"] if exc.headers else "/login", 303)
    if "text/html" in request.headers.get("accept", ""):
        env: Env = request.app.state.env
        return Web(env).page(request, "error.html", exc.status_code, message=exc.detail)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


def _crashed(request: Request, exc: Exception) -> Response:
    """An unexpected failure: logged, the page says so without a stack trace."""
    log.error("console.request_failed", path=request.url.path, error=type(exc).__name__)
    env: Env = request.app.state.env
    return Web(env).error_page(request, exc, 500)


def create_app(
    env: Env,
    secret: str,
    *,
    collector: Collector | None = None,
    https_only: bool = False,
) -> Starlette:
    """The console app; its readers start with the app and stop with it."""
    reader = collector or Collector(env.settings, env.weights)
    console = Console(env, reader)
    act = actions.Actions(env, reader)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        reader.start()
        try:
            yield
        finally:
            reader.stop()

    routes = [
        Route("/login", console.login_form, methods=["GET"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Route("/", console.overview),
        Route("/api/overview", console.overview_json),
        Route("/api/samples", console.samples_json),
        Route("/events", console.events),
        *act.routes(),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=secret,
                session_cookie="cutover_console",
                max_age=env.settings.console.session_max_age_s,
                same_site="strict",
                https_only=https_only,
            )
        ],
        exception_handlers={HTTPException: _denied, Exception: _crashed},
        lifespan=lifespan,
    )
    app.state.env = env
    return app
