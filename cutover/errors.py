"""The one exception tree of kafka-cutover.

Every error the tool raises on purpose derives from :class:`CutoverError`. Vendor exceptions
(psycopg, confluent-kafka, fastavro) are translated into this tree once, at the edge where the
vendor call is made, so callers and the CLI only ever see these classes. Each class carries the
data a caller needs (SQLSTATE, Kafka error code, table, key, file and line) and the exit code the
CLI maps it to::

    CutoverError                      exit 3 unless a subclass says otherwise
    ├── UsageError                    exit 2  bad command line
    │   └── ConfigError               exit 2  bad cutover.toml / environment
    │       └── MappingError          exit 2  bad mapping file (names file, line, problem)
    ├── CheckFailed                   exit 1  a check ran and said no
    │   ├── VerifyMismatch            exit 1  verify found persistent differences
    │   └── GateRefused               exit 1  a cutover gate refused
    └── RuntimeFailure                exit 3  the tool could not do its job
        ├── PrerequisiteMissing       a program the stack needs is not installed
        ├── StackError                a local-stack server did not start or answer
        ├── DatabaseError             PostgreSQL said no (carries sqlstate, which side)
        ├── KafkaError                Kafka said no (carries the librdkafka error code)
        ├── DecodeError               bytes that are not what the protocol promises
        │   ├── UnknownSchema         an Avro fingerprint no schema is known for
        │   └── UncarriableValue      one row's value the envelope cannot carry (dead letter)
        ├── SchemaIncompatible        a source table changed in a way readers cannot follow
        ├── UnmappableRow             a row the mapping cannot map (a poison message)
        ├── SlotSafetyError           the slot moved behind our back: re-snapshot required
        └── TruncateStopped           a TRUNCATE the mapping says to stop on (names the resume)

Messages name the thing and the fix. They never contain secrets: every message passes through
:func:`redact_dsn`, which masks passwords by the DSN's shape and, for DSNs registered with
:func:`register_dsn` (the configured ones, every DSN :func:`cutover.pg.connect` is given), by the
password's value and its fragments, which is what a parse error echoes.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Collection, Sequence
from typing import ClassVar, Final

__all__ = [
    "CheckFailed",
    "ConfigError",
    "CutoverError",
    "DatabaseError",
    "DecodeError",
    "GateRefused",
    "KafkaError",
    "MappingError",
    "PrerequisiteMissing",
    "RuntimeFailure",
    "SchemaIncompatible",
    "SlotSafetyError",
    "StackError",
    "TruncateStopped",
    "UncarriableValue",
    "UnknownSchema",
    "UnmappableRow",
    "UsageError",
    "VerifyMismatch",
    "dsn_passwords",
    "has_secret",
    "redact_dsn",
    "register_dsn",
]

# The words after an unquoted password up to the next key=value (or the end).
_UNQUOTED_TAIL = re.compile(r"((?:\s+[^\s=]+(?=\s|$))*)")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)
# Up to the last "@" of the line that a host follows: a password may itself hold "@", ":",
# quotes or spaces. (Masking too much of a line is the safe side.)
_PASSWORD_URL = re.compile(
    r"(://[^:/@\s'\"]*:)([^\n]*)(@)(?=[\w.\-\[\]]+(?::\d*)?(?:[/?\s'\",:]|$))"
)
# libpq and psycopg echo the token they could not parse: for a DSN whose password has "%", a
# space or "@", that token is (part of) the password. Masked even when the password is unknown.
_PARSE_ECHO = re.compile(
    r"((?:percent-encoded token|unexpected spaces found in|missing \"=\" after"
    r"|URI query parameter):? \")([^\"]*)(\")"
)
# A host name with an "@" in it is the tail of a password that held "@" ('RIT6@127.0.0.1').
_HOST_WITH_AT = re.compile(r"(['\"])[^'\"\s]*@(?=[^'\"\s]*\1)")
_URL_PREFIX = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*://")
_FRAGMENT_SPLIT = re.compile(r"[\s@%:/?#&'\"\\=]+")
# Secrets (and fragments) shorter than this are not masked by value: they would blank ordinary
# words and numbers everywhere. The shape-based masks above still apply to them.
_MIN_FRAGMENT = 3
_SECRETS: set[str] = set()


def dsn_passwords(dsn: str) -> set[str]:
    """The password(s) a DSN holds, found by its shape even when libpq could not parse it."""
    found: set[str] = set()
    if _URL_PREFIX.match(dsn):
        rest = _URL_PREFIX.sub("", dsn)
        userinfo, at, _host = rest.rpartition("@")
        if at and ":" in userinfo:
            found.add(userinfo.partition(":")[2])
    for match in _PASSWORD_KV.finditer(dsn):
        value = match.group(2)
        if value.startswith("'") and value.endswith("'") and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        else:
            # An unquoted password with a space ("password=abc def") is cut by libpq at the
            # space; the words up to the next key=value are still the user's secret.
            tail = _UNQUOTED_TAIL.match(dsn, match.end())
            if tail and tail.group(1):
                found.add(f"{value}{tail.group(1)}")
        found.add(value)
    return {p for p in found if p}


def register_dsn(dsn: str) -> None:
    """Remember the DSN's password(s): every later message and log line masks them, and the
    fragments a parse error may echo (a password cut at a "%", a space or an "@")."""
    for password in dsn_passwords(dsn):
        for secret in (password, urllib.parse.unquote(password)):
            pieces = [secret, *_FRAGMENT_SPLIT.split(secret)]
            _SECRETS.update(p for p in pieces if len(p) >= _MIN_FRAGMENT)


def register_secret(secret: str) -> None:
    """Remember a secret that is not in a DSN (the schema registry's password): masked alike."""
    if len(secret) >= _MIN_FRAGMENT:
        _SECRETS.add(secret)
        _SECRETS.add(urllib.parse.quote(secret, safe=""))


def has_secret(text: str) -> bool:
    """True if ``text`` contains a registered password (or a fragment of one)."""
    return any(secret in text for secret in _SECRETS)


def redact_dsn(text: str) -> str:
    """Return ``text`` with every DSN password masked: by shape (key=value, URL, libpq's echo of
    an unparsable token) and by value (every password :func:`register_dsn` has seen)."""
    text = _PASSWORD_KV.sub(r"\1***", text)
    text = _PASSWORD_URL.sub(r"\1***\3", text)
    text = _PARSE_ECHO.sub(r"\1***\3", text)
    text = _HOST_WITH_AT.sub(r"\1***@", text)
    # Longest first: a fragment must not break up a longer secret before that one is masked.
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class CutoverError(Exception):
    """Base of every error kafka-cutover raises on purpose."""

    exit_code: ClassVar[int] = 3

    def __init__(self, message: str) -> None:
        self.message = redact_dsn(message)
        super().__init__(self.message)


class UsageError(CutoverError):
    """The command line asks for something that cannot be done as written."""

    exit_code = 2


class ConfigError(UsageError):
    """The configuration (file or ``CUTOVER_*`` environment) is missing or wrong."""


class MappingError(ConfigError):
    """The mapping file is invalid; names the file, the line (when known) and the problem."""

    def __init__(self, path: str, problem: str, line: int | None = None) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")


class CheckFailed(CutoverError):
    """A check ran to the end and its answer is no."""

    exit_code = 1


class VerifyMismatch(CheckFailed):
    """Verify found differences that persisted after the consumers caught up."""


class GateRefused(CheckFailed):
    """A cutover gate refused the transition; ``failing`` lists the gates and their evidence."""

    def __init__(self, message: str, failing: list[str] | None = None) -> None:
        self.failing = failing or []
        super().__init__(message)


class RuntimeFailure(CutoverError):
    """The tool could not do its job (a server is down, a delivery failed, ...)."""

    exit_code = 3


class PrerequisiteMissing(RuntimeFailure):
    """A program the local stack needs is not installed; says how to install it."""

    def __init__(self, program: str, install_hint: str) -> None:
        self.program = program
        self.install_hint = install_hint
        super().__init__(
            f"{program} is required but was not found; install it with: {install_hint}"
        )


class StackError(RuntimeFailure):
    """A local-stack server did not start or did not answer in time."""


class DatabaseError(RuntimeFailure):
    """PostgreSQL refused or failed; carries which side (source/target) and the SQLSTATE."""

    def __init__(self, message: str, *, side: str, sqlstate: str | None = None) -> None:
        self.side = side
        self.sqlstate = sqlstate
        suffix = f" (SQLSTATE {sqlstate})" if sqlstate else ""
        super().__init__(f"{side} database: {message}{suffix}")


class KafkaError(RuntimeFailure):
    """Kafka refused or failed; carries the librdkafka error name when there is one."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code
        suffix = f" ({code})" if code else ""
        super().__init__(f"kafka: {message}{suffix}")


class KafkaAccessError(ConfigError):
    """Kafka refused our principal: its login failed, or an ACL denies what it asked for.

    A configuration problem (which user, which password, which ACLs), not a passing failure:
    retrying cannot help, so it ends the process with the usage/config exit code.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code
        suffix = f" ({code})" if code else ""
        super().__init__(f"kafka: {message}{suffix}")


class DecodeError(RuntimeFailure):
    """Bytes that do not follow the protocol or encoding they claim (pgoutput, Avro)."""


class UnknownSchema(DecodeError):
    """A message whose writer schema is known nowhere: a single-object fingerprint in no known
    schema, or a Confluent schema id the registry answered it does not have (poison, unlike
    a registry that does not answer)."""

    def __init__(
        self, fingerprint: int | None = None, *, schema_id: int | None = None, reason: str = ""
    ) -> None:
        self.fingerprint = fingerprint
        self.schema_id = schema_id
        if schema_id is not None:
            message = f"unknown schema id {schema_id}: not in the schema registry ({reason})"
        else:
            message = (
                f"unknown Avro schema fingerprint {fingerprint or 0:016x}: not in the schemas topic"
            )
        super().__init__(message)


class UncarriableValue(DecodeError):
    """One row cannot be carried by the envelope: a value (NaN, +-infinity, text the type cannot
    hold) or the whole event (over the message size limit).

    The producer turns it into a dead letter of that row instead of stopping the stream
    (:mod:`producers.row_letters`). ``reason`` is a word of a fixed vocabulary and ``column`` a
    column name: neither ever holds a value, so the dead letter can be built from them alone.
    The message may show the value (as :class:`DecodeError` always did): it is not used there.
    ``row`` is what could be decoded of the row (for its key), when the decoder knows it.
    """

    def __init__(
        self,
        message: str,
        *,
        table: str,
        column: str | None,
        reason: str,
        row: dict[str, object] | None = None,
    ) -> None:
        self.table = table
        self.column = column
        self.reason = reason
        self.row = row
        super().__init__(message)


class SchemaIncompatible(RuntimeFailure):
    """A source table changed in a way consumers cannot follow (e.g. a column changed type)."""

    def __init__(self, table: str, problem: str) -> None:
        self.table = table
        super().__init__(f"incompatible schema change of {table}: {problem}")


class SchemaRegistryError(RuntimeFailure):
    """The schema registry is unreachable or refused a request; carries its HTTP status and
    error code when it answered (a refused incompatible schema: 409)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_code: int | None = None,
        reason: str | None = None,
    ) -> None:
        self.status = status
        self.error_code = error_code
        # The registry's own words (its "message"), when it answered.
        self.reason = reason
        suffix = f" (HTTP {status}, error code {error_code})" if status is not None else ""
        super().__init__(f"schema registry: {message}{suffix}")


class _Redacted:
    """Stands in for a value of a sensitive column in a message."""

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


REDACTED: Final = _Redacted()
_NO_VALUE: Final = object()


class UnmappableRow(RuntimeFailure):
    """A row the mapping cannot map: a poison message, routed to the dead-letter topic.

    The offending value, when the message shows it, is kept apart (``value``, written as
    ``{value}`` or ``{value!r}`` in ``problem``) so that :meth:`redacted` can hide it when its
    ``source_column`` is one the mapping marks sensitive: keys and column names stay.
    """

    def __init__(
        self,
        table: str,
        column: str | None,
        problem: str,
        *,
        value: object = _NO_VALUE,
        source_column: str | None = None,
    ) -> None:
        self.table = table
        self.column = column
        self.source_column = source_column
        self._template = problem
        self._value = value
        if value is not _NO_VALUE:
            problem = problem.replace("{value!r}", repr(value)).replace("{value}", str(value))
        self.problem = problem
        where = f"{table}.{column}" if column else table
        super().__init__(f"cannot map {where}: {problem}")

    def redacted(self, sensitive: Collection[str]) -> UnmappableRow:
        """This error with its value hidden if it comes from a column in ``sensitive``."""
        if self._value is _NO_VALUE or self.source_column not in sensitive:
            return self
        return UnmappableRow(
            self.table,
            self.column,
            self._template,
            value=REDACTED,
            source_column=self.source_column,
        )


class SlotSafetyError(RuntimeFailure):
    """The replication slot disagrees with what we delivered: possible data loss."""


class TruncateStopped(RuntimeFailure):
    """The producer stopped before a TRUNCATE of a table whose ``on_truncate`` is "stop"; the
    message names the tables, the commit LSN and the command that resumes."""

    def __init__(self, message: str, tables: Sequence[str], lsn: int) -> None:
        self.tables = tuple(tables)
        self.lsn = lsn
        super().__init__(message)
