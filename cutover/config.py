"""Typed, frozen configuration, built once at the entry point and passed down.

Sources, later ones winning:

1. the TOML file (``--config``, else ``$CUTOVER_CONFIG``, else ``./cutover.toml``);
2. the environment: ``CUTOVER_SOURCE_DSN``, ``CUTOVER_TARGET_DSN``, ``CUTOVER_KAFKA_BOOTSTRAP``,
   ``CUTOVER_TOPIC_PREFIX``, ``CUTOVER_SCHEMA_REGISTRY_URL``, ``CUTOVER_SCHEMA_REGISTRY_PASSWORD``,
   ``CUTOVER_CONSOLE_SECRET`` (the web console's session secret),
   and the Kafka security settings (``CUTOVER_KAFKA_SECURITY_PROTOCOL``, ``..._SASL_USERNAME``,
   ``..._SASL_PASSWORD``, ``..._SASL_PASSWORD_FILE``, ``CUTOVER_KAFKA_CA``, ...: ``_KAFKA_ENV``).

Nothing below the entry point reads the environment: :func:`load_settings` takes it as an
argument. Unknown keys are errors (a typo must not silently fall back to a default). Relative
paths in the file (the mapping file) are resolved against the file's folder. DSNs hold secrets:
they are never put in a message (see :func:`cutover.errors.redact_dsn`) and ``Settings.__repr__``
masks them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from cutover.errors import ConfigError, redact_dsn, register_dsn, register_secret

ENV_PREFIX = "CUTOVER_"


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """The legacy (old shop) PostgreSQL database and its logical-decoding objects."""

    dsn: str = field(repr=False)
    slot: str = "cutover_slot"
    publication: str = "cutover_pub"
    # How many pgoutput messages one peek may return: bounds producer memory.
    peek_batch: int = 20_000
    # How the producer reads the slot (producers.slot_reader): "sql" peeks and advances (the
    # WAL is decoded by each peek and again by the advance); "stream" uses the streaming
    # replication protocol (decoded once, pushed; needs a free WAL sender).
    read_mode: Literal["sql", "stream"] = "stream"
    heartbeat_interval_s: float = 5.0
    snapshot_chunk_rows: int = 20_000


@dataclass(frozen=True, slots=True)
class TargetSettings:
    """The commerce PostgreSQL database the consumers apply into."""

    dsn: str = field(repr=False)
    # Schema holding the tool's own control tables (offsets, dead letters, state, audit).
    control_schema: str = "cutover"


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Kafka connection, topic layout, and librdkafka pass-through settings."""

    bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "shop"
    partitions: int = 6
    replication_factor: int = 1
    # Topic-level min.insync.replicas of the topics init creates: with acks=all, how many
    # replicas must hold an event before it counts as delivered. Unset: 2 when the replication
    # factor is 3 or more, else the broker's default (cutover.topics.min_insync_replicas).
    min_insync_replicas: int | None = None
    # Set: messages are Confluent-framed, schemas registered there (cutover.registry).
    schema_registry_url: str | None = None
    # The largest message: the domain and DLQ topics' max.message.bytes and the producers'
    # message.max.bytes, both set from this one number (an event over it is a dead letter).
    max_message_bytes: int = 4 * 1024 * 1024
    schema_registry_user: str | None = None
    schema_registry_password: str | None = field(default=None, repr=False)
    # TLS: a CA bundle to trust, and a client certificate + key for mutual TLS.
    schema_registry_ca: str | None = None
    schema_registry_cert: str | None = None
    schema_registry_key: str | None = None
    # Security of every Kafka client (cutover.kafka.connection_config; docs/CONFIGURATION.md).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    # The password, or a file holding it (read once at start-up, then kept in sasl_password).
    sasl_password: str | None = field(default=None, repr=False)
    sasl_password_file: str | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    # How the apply group shares the partitions (cutover.kafka, docs/CONFIGURATION.md).
    # "cooperative-sticky" balances partition counts only and may leave a whole topic (the hot
    # payment domain, ~90 % of the events) on one member, but moves only what it must at a
    # rebalance; "range" (eager protocol: every member pauses) splits every topic among them.
    apply_assignment: Literal["cooperative-sticky", "range"] = "cooperative-sticky"
    producer: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    consumer: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        isr = self.min_insync_replicas
        if isr is not None and isr > self.replication_factor:
            # Every acks=all write would fail with NOT_ENOUGH_REPLICAS: refuse it up front.
            raise ConfigError(
                f"[kafka] min_insync_replicas = {isr} is more than [kafka] replication_factor "
                f"= {self.replication_factor}: no write could ever be acknowledged"
            )

    def topic(self, domain: str) -> str:
        return f"{self.topic_prefix}.{domain}"

    def reverse_topic(self, domain: str) -> str:
        """The topic of the reverse direction (commerce → legacy) for ``domain``."""
        return f"{self.topic_prefix}.reverse.{domain}"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def control_topic(self) -> str:
        return f"{self.topic_prefix}.control"

    @property
    def schemas_topic(self) -> str:
        return f"{self.topic_prefix}.schemas"


@dataclass(frozen=True, slots=True)
class ApplySettings:
    """Apply-consumer behaviour."""

    group_id: str = "cutover-apply"
    batch_max_events: int = 5_000
    batch_max_wait_ms: int = 100
    dlq_policy: Literal["dlq", "halt"] = "dlq"


@dataclass(frozen=True, slots=True)
class ReverseSettings:
    """The reverse direction of the write cutover (commerce → legacy, docs/CUTOVER.md).

    Its logical-decoding objects live in commerce ([target] dsn), its topics are
    ``<topic_prefix>.reverse.<domain>``, its appliers form their own group and keep their
    positions in legacy, in ``control_schema``.
    """

    slot: str = "cutover_reverse_slot"
    publication: str = "cutover_reverse_pub"
    group_id: str = "cutover-apply-reverse"
    control_schema: str = "cutover"


@dataclass(frozen=True, slots=True)
class GateSettings:
    """Thresholds of the cutover gates."""

    verify_max_age_minutes: int = 15
    max_apply_lag_events: int = 1_000
    max_heartbeat_age_s: float = 60.0
    # Soak times (0 allowed: a sandbox or a test may skip them): how long a domain must have
    # served reads from commerce before its writes move, and writes before `complete`.
    min_reads_soak_minutes: float = 60.0
    min_writes_soak_minutes: float = 1_440.0


@dataclass(frozen=True, slots=True)
class RoleSettings:
    """The least-privilege database roles ``cutover init --print-grants`` prints (cutover.grants).

    Names only: passwords are never part of the config's grants (set them with ``\\password``).
    """

    producer: str = "cutover_producer"
    applier: str = "cutover_applier"
    reverse_applier: str = "cutover_reverse_applier"
    sre: str = "cutover_sre"
    # NOLOGIN role owning commerce's control tables: the commands create and migrate them on
    # first use (CREATE TABLE/INDEX IF NOT EXISTS needs the owner), so the SRE role is a member.
    control_owner: str = "cutover_control"


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """One login of the web console: a password HASH (``cutover console hash-password``)."""

    name: str
    role: Literal["viewer", "operator"]
    password_hash: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """The web console (``cutover console``, docs/CONSOLE.md): its users and session secret.

    The secret signs the session cookies: ``CUTOVER_CONSOLE_SECRET`` or the file
    ``session_secret_file`` (read when the console starts, never logged).
    """

    users: tuple[ConsoleUser, ...] = ()
    session_secret_file: Path | None = None
    session_secret: str | None = field(default=None, repr=False)
    session_max_age_s: int = 8 * 3600
    # Failed logins allowed per user and per client address within the window (then 429).
    max_failed_logins: int = 5
    failed_login_window_s: int = 300


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a command needs, resolved once."""

    source: SourceSettings
    target: TargetSettings
    kafka: KafkaSettings
    mapping_path: Path
    apply: ApplySettings = ApplySettings()
    gates: GateSettings = GateSettings()
    reverse: ReverseSettings = ReverseSettings()
    roles: RoleSettings = RoleSettings()
    metrics_port: int | None = None
    config_path: Path | None = None
    console: ConsoleSettings = ConsoleSettings()


FIELD_ROLE = "Literal['viewer', 'operator']"

_SECTION_TYPES: dict[str, type[Any]] = {
    "source": SourceSettings,
    "target": TargetSettings,
    "kafka": KafkaSettings,
    "apply": ApplySettings,
    "gates": GateSettings,
    "reverse": ReverseSettings,
    "roles": RoleSettings,
}
# Settings that may be 0 (every other number must be positive).
_ZERO_ALLOWED = frozenset({"min_reads_soak_minutes", "min_writes_soak_minutes"})
_TOP_KEYS = {*_SECTION_TYPES, "mapping", "metrics", "console"}
_CONSOLE_NUMBERS = ("session_max_age_s", "max_failed_logins", "failed_login_window_s")


def _check_type(section: str, key: str, value: Any, expected: str) -> Any:
    """Return ``value`` if it fits the annotated type ``expected`` (a string annotation)."""
    if expected.startswith("Mapping"):
        if not isinstance(value, dict):
            raise ConfigError(f"[{section}] {key} must be a table of librdkafka settings")
        return dict(value)
    if expected.startswith("Literal"):
        allowed = [a.strip().strip("'\"") for a in expected[len("Literal[") : -1].split(",")]
        if value not in allowed:
            raise ConfigError(f"[{section}] {key} must be one of {allowed}, not {value!r}")
        return value
    kinds: dict[str, tuple[type, ...]] = {
        "str": (str,),
        "int": (int,),
        "float": (int, float),
        "str | None": (str,),
        "int | None": (int,),
    }
    allowed_types = kinds.get(expected, (object,))
    if isinstance(value, bool) or not isinstance(value, allowed_types):
        raise ConfigError(f"[{section}] {key} must be of type {expected}, not {value!r}")
    if expected in ("int", "float", "int | None"):
        number = cast(float, value)
        if number < 0 or (number == 0 and key not in _ZERO_ALLOWED):
            floor = "0 or more" if key in _ZERO_ALLOWED else "positive"
            raise ConfigError(f"[{section}] {key} must be {floor}, not {value!r}")
        return float(number) if expected == "float" else value
    return value


_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")


def _check_value(section: str, key: str, value: Any) -> None:
    """Refuse values PostgreSQL would refuse later, after part of the work was done."""
    if key == "slot" and not _SLOT_NAME.fullmatch(value):
        # PostgreSQL's rule (ReplicationSlotValidateName), checked here so that `init` does not
        # create the publication and then fail on the slot.
        raise ConfigError(
            f"[{section}] {key} = {value!r} is not a valid replication slot name: use 1 to 63 "
            "lower-case letters, digits and underscores"
        )


def _build(section: str, cls: type[Any], raw: Mapping[str, Any], extra: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in {**raw, **extra}.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown setting [{section}] {key}; known settings: {known}")
        values[key] = _check_type(section, key, value, str(fields[key].type))
        _check_value(section, key, values[key])
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        env = {"dsn": f"{ENV_PREFIX}{section.upper()}_DSN"}.get(missing[0], "")
        hint = f" or set {env}" if env else ""
        raise ConfigError(
            f"missing setting [{section}] {missing[0]}: add it to the config file{hint}"
        )
    return cls(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found: pass --config FILE or set CUTOVER_CONFIG"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_settings(
    path: Path | None,
    environ: Mapping[str, str],
    *,
    require_file: bool = True,
) -> Settings:
    """Build :class:`Settings` from the config file and the ``CUTOVER_*`` variables in ``environ``.

    ``path`` None means ``$CUTOVER_CONFIG`` or ``./cutover.toml``. With ``require_file`` False, a
    missing default file is allowed when the environment supplies what is required.
    """
    explicit = path is not None or "CUTOVER_CONFIG" in environ
    config_path = path or Path(environ.get("CUTOVER_CONFIG", "cutover.toml"))
    raw: dict[str, Any] = {}
    if explicit or require_file or config_path.exists():
        raw = _read_toml(config_path)
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(
            f"unknown section {sorted(unknown)[0]!r} in {config_path}; "
            f"known sections: {', '.join(sorted(_TOP_KEYS))}"
        )
    env_over: dict[str, dict[str, Any]] = {s: {} for s in _SECTION_TYPES}
    for var, (section, key) in {
        "CUTOVER_SOURCE_DSN": ("source", "dsn"),
        "CUTOVER_TARGET_DSN": ("target", "dsn"),
        "CUTOVER_KAFKA_BOOTSTRAP": ("kafka", "bootstrap"),
        "CUTOVER_TOPIC_PREFIX": ("kafka", "topic_prefix"),
        "CUTOVER_SCHEMA_REGISTRY_URL": ("kafka", "schema_registry_url"),
        "CUTOVER_SCHEMA_REGISTRY_PASSWORD": ("kafka", "schema_registry_password"),
        **{var: ("kafka", key) for var, key in _KAFKA_ENV.items()},
    }.items():
        if environ.get(var):
            env_over[section][key] = environ[var]
    sections = {
        name: _build(name, cls, _table(raw, name, config_path), env_over[name])
        for name, cls in _SECTION_TYPES.items()
    }
    mapping_raw = _table(raw, "mapping", config_path)
    mapping_file = mapping_raw.get("file", "mapping.toml")
    if not isinstance(mapping_file, str) or set(mapping_raw) - {"file"}:
        raise ConfigError(f'[mapping] takes one setting, file = "PATH" (in {config_path})')
    base = config_path.parent if config_path.exists() else Path.cwd()
    sections["kafka"] = kafka_security(sections["kafka"], base)
    metrics = _table(raw, "metrics", config_path)
    port = metrics.get("port")
    if port is not None and (not isinstance(port, int) or not 0 <= port < 65536):
        raise ConfigError(f"[metrics] port must be an integer 0-65535, not {port!r}")
    # From here on every message and log line masks these passwords, even the fragments of one
    # that libpq echoes when it cannot parse the DSN.
    register_dsn(sections["source"].dsn)
    register_dsn(sections["target"].dsn)
    _register_registry_secrets(sections["kafka"])
    return Settings(
        source=sections["source"],
        target=sections["target"],
        kafka=sections["kafka"],
        apply=sections["apply"],
        gates=sections["gates"],
        reverse=sections["reverse"],
        roles=sections["roles"],
        mapping_path=(base / mapping_file).resolve(),
        metrics_port=port,
        config_path=config_path.resolve() if config_path.exists() else None,
        console=_console(_table(raw, "console", config_path), base, environ),
    )


def _console(raw: Mapping[str, Any], base: Path, environ: Mapping[str, str]) -> ConsoleSettings:
    """``[console]``: numbers, the secret file, and ``[console.users.NAME]`` role + hash."""
    known = {"users", "session_secret_file", *_CONSOLE_NUMBERS}
    if unknown := set(raw) - known:
        raise ConfigError(
            f"unknown setting [console] {sorted(unknown)[0]}; known settings: "
            + ", ".join(sorted(known))
        )
    numbers = {k: _check_type("console", k, raw[k], "int") for k in _CONSOLE_NUMBERS if k in raw}
    users: list[ConsoleUser] = []
    for name, user in _table(raw, "users", base).items():
        if not isinstance(user, dict) or set(user) != {"role", "password_hash"}:
            raise ConfigError(
                f"[console.users.{name}] takes role and password_hash (make the hash with "
                "`cutover console hash-password`)"
            )
        role = _check_type(f"console.users.{name}", "role", user["role"], FIELD_ROLE)
        digest = _check_type(f"console.users.{name}", "password_hash", user["password_hash"], "str")
        users.append(ConsoleUser(name, role, digest))
    secret_file = raw.get("session_secret_file")
    if secret_file is not None and not isinstance(secret_file, str):
        raise ConfigError("[console] session_secret_file must be a path string")
    secret = environ.get("CUTOVER_CONSOLE_SECRET") or None
    if secret:
        register_secret(secret)
    return ConsoleSettings(
        users=tuple(users),
        session_secret_file=None if secret_file is None else (base / secret_file).resolve(),
        session_secret=secret,
        **numbers,
    )


def _register_registry_secrets(kafka: KafkaSettings) -> None:
    """The registry's password (setting or in its URL) is masked like the DSN passwords."""
    if kafka.schema_registry_password:
        register_secret(kafka.schema_registry_password)
    if kafka.schema_registry_url:
        register_dsn(kafka.schema_registry_url)
    if kafka.schema_registry_password and not kafka.schema_registry_user:
        raise ConfigError("[kafka] schema_registry_password needs schema_registry_user")


#: The environment variables of the Kafka security settings (each overrides its [kafka] key).
_KAFKA_ENV = {
    "CUTOVER_KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "CUTOVER_KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "CUTOVER_KAFKA_SASL_USERNAME": "sasl_username",
    "CUTOVER_KAFKA_SASL_PASSWORD": "sasl_password",
    "CUTOVER_KAFKA_SASL_PASSWORD_FILE": "sasl_password_file",
    "CUTOVER_KAFKA_CA": "ssl_ca_location",
    "CUTOVER_KAFKA_CERT": "ssl_certificate_location",
    "CUTOVER_KAFKA_KEY": "ssl_key_location",
}
_FILE_SETTINGS = ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location")


def _setting(key: str) -> str:
    """How a user names ``[kafka] key``: the file setting and its environment variable."""
    env = next((var for var, k in _KAFKA_ENV.items() if k == key), None)
    return f"[kafka] {key}" + (f" (or {env})" if env else "")


def _read_password_file(path: Path) -> str:
    try:
        password = path.read_text().strip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"{_setting('sasl_password_file')} = {path} cannot be read ({exc.strerror}): "
            "point it at the file holding the Kafka user's password"
        ) from None
    if not password:
        raise ConfigError(
            f"{_setting('sasl_password_file')} = {path} is empty: write the password into it"
        )
    return password


def kafka_security(kafka: KafkaSettings, base: Path) -> KafkaSettings:
    """Check the [kafka] security settings, read the password file, register the password.

    Every problem is a ConfigError naming the setting and the fix: a client that would
    silently connect without the security the user asked for (a username with PLAINTEXT, a CA
    that is not there) must not start.
    """
    sasl = kafka.security_protocol.startswith("SASL_")
    tls = kafka.security_protocol.endswith("SSL")
    resolved: dict[str, Any] = {}
    for key in (*_FILE_SETTINGS, "sasl_password_file"):
        value = getattr(kafka, key)
        if value is None:
            continue
        if not tls and key in _FILE_SETTINGS:
            raise ConfigError(
                f"{_setting(key)} is set but [kafka] security_protocol is "
                f"{kafka.security_protocol}: set security_protocol = SASL_SSL (or SSL) to use TLS"
            )
        path = base / value
        if key in _FILE_SETTINGS and not path.is_file():
            raise ConfigError(f"{_setting(key)} = {path}: no such file; fix the path")
        resolved[key] = str(path)
    if (kafka.ssl_certificate_location is None) != (kafka.ssl_key_location is None):
        raise ConfigError(
            "[kafka] ssl_certificate_location and ssl_key_location go together (mutual TLS): "
            "set both or neither"
        )
    if kafka.sasl_password is not None and kafka.sasl_password_file is not None:
        raise ConfigError(
            f"both {_setting('sasl_password')} and {_setting('sasl_password_file')} are set: "
            "keep one"
        )
    if "sasl_password_file" in resolved:
        resolved["sasl_password"] = _read_password_file(Path(resolved["sasl_password_file"]))
    password = resolved.get("sasl_password", kafka.sasl_password)
    if not sasl and (kafka.sasl_username or password):
        raise ConfigError(
            f"a Kafka SASL user or password is set but [kafka] security_protocol is "
            f"{kafka.security_protocol}: set security_protocol = SASL_SSL to log in with it"
        )
    if sasl and not (kafka.sasl_username and password):
        missing = "sasl_username" if not kafka.sasl_username else "sasl_password_file"
        raise ConfigError(
            f"[kafka] security_protocol = {kafka.security_protocol} needs a user and its "
            f"password: set {_setting(missing)}"
        )
    if password:
        register_secret(password)
    for table in (kafka.producer, kafka.consumer):
        # Secrets passed through to librdkafka are masked alike.
        for key in ("sasl.password", "ssl.key.password"):
            if isinstance(table.get(key), str):
                register_secret(str(table[key]))
    return dataclasses.replace(kafka, **resolved) if resolved else kafka


def _table(raw: Mapping[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] in {path} must be a table")
    return value


def describe(settings: Settings) -> dict[str, Any]:
    """A secret-free view of the settings, for logs and ``--json`` output."""
    out = dataclasses.asdict(settings)
    out["source"]["dsn"] = redact_dsn(settings.source.dsn)
    out["target"]["dsn"] = redact_dsn(settings.target.dsn)
    if settings.kafka.schema_registry_url:
        out["kafka"]["schema_registry_url"] = redact_dsn(settings.kafka.schema_registry_url)
    if settings.kafka.schema_registry_password:
        out["kafka"]["schema_registry_password"] = "***"
    console = out["console"]
    console["session_secret"] = "***" if settings.console.session_secret else None
    console["session_secret_file"] = str(settings.console.session_secret_file or "") or None
    for user in console["users"]:
        user["password_hash"] = "***"
    if settings.kafka.sasl_password:
        out["kafka"]["sasl_password"] = "***"
    for table in ("producer", "consumer"):
        for key in ("sasl.password", "ssl.key.password"):
            if key in out["kafka"][table]:
                out["kafka"][table][key] = "***"
    out["mapping_path"] = str(settings.mapping_path)
    out["config_path"] = str(settings.config_path) if settings.config_path else None
    return out


def environ_snapshot() -> dict[str, str]:
    """The only place the process environment is read for settings (the CLI entry point)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
