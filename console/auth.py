"""Who may do what in the web console, and the checks around a login (pure, no I/O).

* **Passwords** are stored as argon2id hashes (argon2-cffi), made by ``cutover console
  hash-password``; :func:`authenticate` verifies one and spends the same work for an unknown
  user, so response time does not tell which user names exist.
* **Roles**: a ``viewer`` sees every page and changes nothing; an ``operator`` may also run the
  cutover actions and retry dead letters (:func:`may`).
* **Failed-login limit** (:class:`LoginLimiter`): after ``max_failed_logins`` failures within
  the window, per user name and per client address alike, further attempts are refused (429)
  until the oldest failure leaves the window.
* **CSRF**: every session carries a random token (:func:`new_csrf_token`) that each
  state-changing request must send back (:func:`csrf_ok`); a cross-site form cannot read it.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from cutover.config import ConsoleUser

__all__ = [
    "ACTIONS",
    "LoginLimiter",
    "authenticate",
    "csrf_ok",
    "hash_password",
    "may",
    "new_csrf_token",
    "verify_password",
]

Role = Literal["viewer", "operator"]

#: What an operator may do and a viewer may not (the transitions, and re-driving dead letters).
ACTIONS = frozenset(
    {"switch-reads", "rollback", "switch-writes", "rollback-writes", "complete", "dlq-retry"}
)

_HASHER = PasswordHasher()
# Verified against when the user name is unknown: the same argon2 work as a real check.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (salted: two calls never give the same string)."""
    if not password:
        raise ValueError("the password is empty")
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True if ``password`` matches; a malformed hash is a mismatch, never an exception."""
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def authenticate(users: Iterable[ConsoleUser], name: str, password: str) -> ConsoleUser | None:
    """The user ``name`` if ``password`` is theirs, else None."""
    # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a no).
    wanted = name.encode()
    user = next((u for u in users if hmac.compare_digest(u.name.encode(), wanted)), None)
    if user is None:
        verify_password(_DUMMY_HASH, password)
        return None
    return user if verify_password(user.password_hash, password) else None


def may(role: str, action: str) -> bool:
    """Whether ``role`` may perform ``action``: viewing (``view``) is for every role, the
    :data:`ACTIONS` for operators only; anything unknown is refused (fail closed)."""
    if action == "view":
        return role in ("viewer", "operator")
    return role == "operator" and action in ACTIONS


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, sent: str | None) -> bool:
    """The token sent with a request matches its session's (constant-time; missing = no)."""
    if not expected or not sent:
        return False
    return hmac.compare_digest(expected.encode(), sent.encode())


class LoginLimiter:
    """Failed logins per key (``user:NAME``, ``ip:ADDRESS``) in a sliding window."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    @staticmethod
    def _keys(user: str, address: str) -> tuple[str, str]:
        return f"user:{user}", f"ip:{address}"

    def _recent(self, key: str) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        cutoff = self._clock() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def blocked(self, user: str, address: str) -> bool:
        """Too many recent failures for this user name or this client address."""
        return any(len(self._recent(k)) >= self.max_failures for k in self._keys(user, address))

    def retry_after_s(self, user: str, address: str) -> int:
        """Seconds until an attempt is allowed again (0 when it is now)."""
        waits = [
            times[0] + self.window_s - self._clock()
            for k in self._keys(user, address)
            if len(times := self._recent(k)) >= self.max_failures
        ]
        return max(0, int(max(waits, default=0.0)) + 1) if waits else 0

    def failed(self, user: str, address: str) -> None:
        now = self._clock()
        for key in self._keys(user, address):
            self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, user: str) -> None:
        """A good password clears that user's failures (not the address's: one known account
        must not reset the count of guesses at the others)."""
        self._failures.pop(f"user:{user}", None)
