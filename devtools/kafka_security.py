"""Kafka security of the secured local stack (``make up SECURE=1``): TLS, SASL/SCRAM, ACLs.

What :mod:`devtools.stack` asks of this module when a stack is secured:

* :func:`prepare`: the brokers' certificate, from the stack's CA (:mod:`devtools.tls`; the one
  PostgreSQL's TLS uses too) under ``<stack>/tls/``, and a password per SCRAM user, generated
  per stack (``secrets``), under ``<stack>/secrets/`` (folder 0700, files 0600; never printed);
* :func:`format_args`: the users' SCRAM-SHA-512 credentials, added when the storage is formatted
  (KRaft keeps them in the metadata log, so they exist before the first client connects);
* :func:`node_properties`: a node's ``server.properties`` made secure. Clients reach the brokers
  on a ``SASL_SSL`` listener (TLS with the CA's certificate as a PEM keystore, SCRAM-SHA-512);
  the brokers talk to each other on it too, as the ``admin`` super user. The controller listener
  stays on loopback and takes only mutual TLS (the brokers' certificate, principal ``kafka``,
  also a super user), so nobody reaches the quorum without a certificate of the stack's CA. The
  StandardAuthorizer denies whatever no ACL allows;
* :func:`grant`: the ACLs of the component users, for a topic prefix (``shop`` by default; a test
  with its own prefix calls it again for that prefix):

  - ``producer`` writes the pipeline's topics (domain, reverse, schemas, control) but never the
    dead-letter topic (a DENY, which wins over the prefixed ALLOW), and reads nothing;
  - ``applier`` reads the pipeline's topics but not the dead letters, writes the dead-letter
    topic, and uses the appliers' groups (``cutover-apply*``);
  - ``operator`` (the control plane, ``init``, replay, monitor) creates and configures the
    topics, reads and writes them (replay), dead letters included, and uses the ``cutover-*``
    groups;
* :func:`env`: the settings of ``<stack>/env``: the protocol, the CA, and a user and a password
  FILE per component (``CUTOVER_KAFKA_SASL_USERNAME`` is the operator's).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from devtools import tls

ADMIN: Final = "admin"
#: The component users; each process runs as one of them.
USERS: Final = ("producer", "applier", "operator")
#: The brokers' certificate name: the principal of the controller listener (mutual TLS).
BROKER_CERT: Final = "kafka"
MECHANISM: Final = "SCRAM-SHA-512"
DEFAULT_PREFIX: Final = "shop"
#: Appliers' groups: forward and reverse, and their schema readers.
APPLY_GROUPS: Final = "cutover-apply"
TOOL_GROUPS: Final = "cutover-"


#: The variables :func:`env` writes, besides the per-component users and password files.
ENV_VARS: Final = (
    "CUTOVER_KAFKA_SECURITY_PROTOCOL",
    "CUTOVER_KAFKA_SASL_MECHANISM",
    "CUTOVER_KAFKA_CA",
    "CUTOVER_KAFKA_SASL_USERNAME",
    "CUTOVER_KAFKA_SASL_PASSWORD_FILE",
)


def tls_dir(root: Path) -> Path:
    return root / "tls"


def secret_file(root: Path, user: str) -> Path:
    """The file holding ``user``'s password (0600)."""
    return root / "secrets" / user


def password(root: Path, user: str) -> str:
    return secret_file(root, user).read_text().strip()


def prepare(root: Path, ca: tls.CertificateAuthority) -> None:
    """Make (once per stack) the brokers' certificate (signed by the stack's ``ca``, shared
    with PostgreSQL's TLS) and keystore, and the passwords."""
    folder = tls_dir(root)
    keystore = folder / f"{BROKER_CERT}.pem"
    if not keystore.exists():
        # client=True: the brokers present it to the controllers (mutual TLS) as well.
        issued = tls.issue(ca, folder, BROKER_CERT, client=True)
        _write_private(keystore, issued.key.read_text() + issued.cert.read_text())
    secret_dir = root / "secrets"
    secret_dir.mkdir(mode=0o700, exist_ok=True)
    secret_dir.chmod(0o700)
    for user in (ADMIN, *USERS):
        path = secret_file(root, user)
        if not path.exists():
            # URL-safe: no "=", "," or "]" that would break --add-scram's syntax.
            _write_private(path, secrets.token_urlsafe(24) + "\n")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def format_args(root: Path) -> list[str]:
    """``kafka-storage format`` arguments adding every user's SCRAM credentials."""
    args: list[str] = []
    for user in (ADMIN, *USERS):
        args += ["--add-scram", f"{MECHANISM}=[name={user},password={password(root, user)}]"]
    return args


def node_properties(props_text: str, root: Path) -> str:
    """``server.properties`` of a (plaintext) node made secure; see the module docstring."""
    props = dict(line.split("=", 1) for line in props_text.splitlines() if line)
    folder = tls_dir(root)
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{ADMIN}" password="{password(root, ADMIN)}";'
    )
    for key in ("listeners", "advertised.listeners"):
        props[key] = props[key].replace("PLAINTEXT://", "SASL_SSL://")
    props.update(
        {
            "listener.security.protocol.map": "CONTROLLER:SSL,SASL_SSL:SASL_SSL",
            "inter.broker.listener.name": "SASL_SSL",
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(folder / f"{BROKER_CERT}.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(folder / "ca.crt"),
            "listener.name.controller.ssl.client.auth": "required",
            # The certificate's CN as the principal ("kafka"), not the whole DN.
            "ssl.principal.mapping.rules": "RULE:^CN=([^,]+),.*$/$1/,DEFAULT",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{ADMIN};User:{BROKER_CERT}",
            "allow.everyone.if.no.acl.found": "false",
        }
    )
    return "".join(f"{k}={v}\n" for k, v in props.items())


def client_config(root: Path, user: str = ADMIN) -> dict[str, Any]:
    """librdkafka settings to connect as ``user`` (the stack's own probes use ``admin``)."""
    return {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": MECHANISM,
        "sasl.username": user,
        "sasl.password": password(root, user),
        "ssl.ca.location": str(tls_dir(root) / "ca.crt"),
    }


def env(root: Path) -> dict[str, str]:
    """The secured stack's ``CUTOVER_*`` settings (paths only, never a password)."""
    out = {
        "CUTOVER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CUTOVER_KAFKA_SASL_MECHANISM": MECHANISM,
        "CUTOVER_KAFKA_CA": str(tls_dir(root) / "ca.crt"),
        "CUTOVER_KAFKA_SASL_USERNAME": "operator",
        "CUTOVER_KAFKA_SASL_PASSWORD_FILE": str(secret_file(root, "operator")),
    }
    for user in USERS:
        out[f"CUTOVER_KAFKA_{user.upper()}_USER"] = user
        out[f"CUTOVER_KAFKA_{user.upper()}_PASSWORD_FILE"] = str(secret_file(root, user))
    return out


def as_user(environ: Mapping[str, str], user: str) -> dict[str, str]:
    """``environ`` (with a secured stack's variables) switched to component ``user``."""
    return {
        **environ,
        "CUTOVER_KAFKA_SASL_USERNAME": environ[f"CUTOVER_KAFKA_{user.upper()}_USER"],
        "CUTOVER_KAFKA_SASL_PASSWORD_FILE": environ[f"CUTOVER_KAFKA_{user.upper()}_PASSWORD_FILE"],
    }


def _acls(prefix: str) -> list[tuple[str, str, str, str, str, str]]:
    """(user, resource type, name, pattern, operation, permission) of every ACL."""
    topics = f"{prefix}."
    dlq = f"{prefix}.dlq"
    rows: list[tuple[str, str, str, str, str, str]] = []
    for op in ("WRITE", "DESCRIBE"):
        rows.append(("producer", "TOPIC", topics, "PREFIXED", op, "ALLOW"))
    rows.append(("producer", "TOPIC", dlq, "LITERAL", "WRITE", "DENY"))
    for op in ("READ", "DESCRIBE"):
        rows.append(("applier", "TOPIC", topics, "PREFIXED", op, "ALLOW"))
        rows.append(("applier", "GROUP", APPLY_GROUPS, "PREFIXED", op, "ALLOW"))
    rows.append(("applier", "TOPIC", dlq, "LITERAL", "READ", "DENY"))
    rows.append(("applier", "TOPIC", dlq, "LITERAL", "WRITE", "ALLOW"))
    for op in ("READ", "WRITE", "DESCRIBE", "CREATE", "DESCRIBE_CONFIGS", "ALTER_CONFIGS"):
        rows.append(("operator", "TOPIC", topics, "PREFIXED", op, "ALLOW"))
    for op in ("READ", "DESCRIBE"):
        rows.append(("operator", "GROUP", TOOL_GROUPS, "PREFIXED", op, "ALLOW"))
    for user in USERS:
        # Every producer is idempotent (cutover.kafka); DESCRIBE: the cluster's brokers.
        rows.append((user, "BROKER", "kafka-cluster", "LITERAL", "IDEMPOTENT_WRITE", "ALLOW"))
        rows.append((user, "BROKER", "kafka-cluster", "LITERAL", "DESCRIBE", "ALLOW"))
    return rows


def grant(root: Path, bootstrap: str, prefix: str = DEFAULT_PREFIX, timeout_s: float = 30) -> int:
    """Create the component users' ACLs for topic prefix ``prefix`` (idempotent); how many."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._acl import AclBinding, AclOperation, AclPermissionType
    from confluent_kafka.admin._resource import ResourcePatternType, ResourceType

    admin = AdminClient({"bootstrap.servers": bootstrap, **client_config(root), "log_level": 0})
    bindings = [
        AclBinding(
            ResourceType[kind],
            name,
            ResourcePatternType[pattern],
            f"User:{user}",
            "*",
            AclOperation[op],
            AclPermissionType[permission],
        )
        for user, kind, name, pattern, op, permission in _acls(prefix)
    ]
    for future in admin.create_acls(bindings, request_timeout=timeout_s).values():
        future.result(timeout=timeout_s)
    return len(bindings)
