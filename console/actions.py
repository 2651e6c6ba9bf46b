"""The operator's pages: the cutover actions, the audit trail and the dead letters.

An action is two requests, as at the terminal: a **dry run** (the gates evaluated and shown,
audited as ``dry_run``; nothing changes), then the **action**, confirmed by typing the domain's
name. Both call the very functions ``cutover switch-reads`` & co. call (:data:`COMMANDS`, from
:mod:`control.state`), with the web user as the audit actor: the gates, the refusal with its
reasons, ``--force`` (with a reason) and the audit all behave as in the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from console.live import Collector
from console.web import Env, Web, require
from control.audit import AuditEntry, list_entries
from control.state import (
    CommandOutcome,
    complete,
    open_control,
    rollback,
    rollback_writes,
    switch_reads,
    switch_writes,
)
from cutover.config import Settings
from cutover.errors import CutoverError, GateRefused, UsageError

__all__ = ["COMMANDS", "Actions", "filter_entries"]

#: The web's actions: the CLI's command name → the core it calls (cli/commands/switch_reads.py).
COMMANDS: dict[str, Callable[..., CommandOutcome]] = {
    "switch-reads": switch_reads,
    "rollback": rollback,
    "switch-writes": switch_writes,
    "rollback-writes": rollback_writes,
    "complete": complete,
}
LETTER_STATUSES = ("all", "open", "retried", "resolved")


def filter_entries(
    entries: Sequence[AuditEntry], *, actor: str = "", outcome: str = "", command: str = ""
) -> list[AuditEntry]:
    """The audit entries matching every filter given (empty: any)."""
    return [
        e
        for e in entries
        if (not actor or e.actor == actor)
        and (not outcome or e.outcome == outcome)
        and (not command or e.command == command)
    ]


def _field(form: Any, name: str) -> str:
    value = form.get(name) if form is not None else None
    return value.strip() if isinstance(value, str) else ""


class Actions(Web):
    """Routes of the actions, audit and dead-letter pages."""

    def __init__(self, env: Env, collector: Collector) -> None:
        super().__init__(env)
        self.collector = collector

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/actions/{command}/{domain}/dry-run", self.dry_run, methods=["POST"]),
            Route("/actions/{command}/{domain}", self.act, methods=["POST"]),
            Route("/audit", self.audit),
            Route("/dead-letters", self.letters),
            Route("/dead-letters/retry", self.retry, methods=["POST"]),
        ]

    def _target(self, request: Request) -> tuple[str, str]:
        command, domain = request.path_params["command"], request.path_params["domain"]
        if command not in COMMANDS:
            raise UsageError(f"unknown action {command!r}")
        return command, domain

    async def _run(self, request: Request, command: str, domain: str, **options: Any) -> Response:
        """Call the core; the outcome (or refusal, or error) rendered as the action page."""
        settings: Settings = self.env.settings
        core = COMMANDS[command]
        user = options.pop("actor")
        try:
            outcome = await run_in_threadpool(
                core, settings, self.env.domains, domain, actor=user, **options
            )
        except GateRefused as exc:
            return self.page(
                request,
                "action.html",
                409,
                command=command,
                domain=domain,
                outcome=None,
                refused=exc.message,
                failing=exc.failing,
            )
        except UsageError as exc:
            return self.error_page(request, exc, 400)
        except CutoverError as exc:
            return self.error_page(request, exc, 503)
        if not options.get("dry_run"):
            # The overview must not show the gates of before the action for 5 s.
            await run_in_threadpool(self.collector.refresh_gates)
        return self.page(
            request,
            "action.html",
            200 if outcome.exit_code == 0 else 409,
            command=command,
            domain=domain,
            outcome=outcome,
            refused=None,
            failing=[],
        )

    async def dry_run(self, request: Request) -> Response:
        try:
            command, domain = self._target(request)
        except UsageError as exc:
            await require(request, self.env.settings)
            return self.error_page(request, exc, 404)
        user, _form = await require(request, self.env.settings, command)
        return await self._run(request, command, domain, actor=user.name, dry_run=True)

    async def act(self, request: Request) -> Response:
        try:
            command, domain = self._target(request)
        except UsageError as exc:
            await require(request, self.env.settings)
            return self.error_page(request, exc, 404)
        user, form = await require(request, self.env.settings, command)
        typed = _field(form, "confirm")
        if typed != domain:
            return self.error_page(
                request,
                UsageError(f"type the domain name {domain!r} to confirm (typed {typed!r})"),
                400,
            )
        force = _field(form, "force") == "on"
        reason = _field(form, "reason") or None
        return await self._run(
            request, command, domain, actor=user.name, force=force, reason=reason
        )

    async def audit(self, request: Request) -> Response:
        await require(request, self.env.settings)
        q = request.query_params
        domain = q.get("domain") or None
        settings = self.env.settings

        def read() -> list[AuditEntry]:
            conn = open_control(settings, [])
            try:
                return list_entries(conn, settings.target.control_schema, domain=domain, limit=500)
            finally:
                conn.close()

        try:
            entries = await run_in_threadpool(read)
        except CutoverError as exc:
            return self.error_page(request, exc)
        shown = filter_entries(
            entries,
            actor=q.get("actor", ""),
            outcome=q.get("outcome", ""),
            command=q.get("command", ""),
        )
        return self.page(
            request, "audit.html", entries=list(reversed(shown)), q=q, domains=self.env.domains
        )

    async def letters(self, request: Request, result: Any = None) -> Response:
        await require(request, self.env.settings)
        status = request.query_params.get("status", "all")
        if status not in LETTER_STATUSES:
            status = "all"
        domain = request.query_params.get("domain", "")
        try:
            rows = await run_in_threadpool(
                self.env.list_letters, self.env.settings, None if status == "all" else status
            )
        except CutoverError as exc:
            return self.error_page(request, exc)
        shown = [r for r in rows if not domain or r.domain == domain]
        return self.page(
            request,
            "dead_letters.html",
            letters=shown,
            letter_status=status,
            statuses=LETTER_STATUSES,
            domain=domain,
            domains=self.env.domains,
            result=result,
        )

    async def retry(self, request: Request) -> Response:
        _user, form = await require(request, self.env.settings, "dlq-retry")
        which = _field(form, "id")
        if which != "all" and not which.isdigit():
            return self.error_page(request, UsageError("retry takes a letter id or 'all'"), 400)
        letter_id = None if which == "all" else int(which)
        try:
            report = await run_in_threadpool(self.env.retry_letters, self.env.settings, letter_id)
        except CutoverError as exc:
            return self.error_page(request, exc)
        return await self.letters(request, result=report.as_json())
