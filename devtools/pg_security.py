"""PostgreSQL over TLS for the secured local stack (``make up SECURE=1``).

Each cluster gets a server certificate from the stack's throwaway CA (:mod:`devtools.tls`):
``ssl = on`` with ``ssl_cert_file``/``ssl_key_file`` in its data folder (the key owned by the
database user, mode 0600: PostgreSQL refuses a key others can read), and ``pg_hba.conf`` takes
TCP connections only over TLS (``hostssl``, SCRAM passwords): a plaintext client is refused.
The clients check the server against the CA, as production should: the stack's DSNs carry
``sslmode=verify-full`` and ``sslrootcert=<ca.crt>`` (:func:`client_params`).

:func:`secure_cluster` runs on a cluster that is initialised and not started (the settings are
read at start); calling it again changes nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Final

from devtools import tls

#: The line ``secure_cluster`` writes into postgresql.conf before its settings (idempotence).
MARKER: Final = "# kafka-cutover secured stack (TLS)"
SERVER_NAME: Final = "postgresql"

# Unix sockets stay as initdb made them (local administration by the database user); every TCP
# connection must be TLS with a password. hostnossl rejects plaintext with a clear message.
_HBA: Final = """\
# kafka-cutover secured stack: TCP only over TLS (devtools/pg_security.py)
local   all             all                                     scram-sha-256
local   replication     all                                     scram-sha-256
hostnossl all           all             0.0.0.0/0               reject
hostssl all             all             127.0.0.1/32            scram-sha-256
hostssl replication     all             127.0.0.1/32            scram-sha-256
"""


def _own(path: Path) -> None:
    """The server runs as ``postgres`` when we are root: it must own its key."""
    if os.geteuid() == 0:
        shutil.chown(path, user="postgres", group="postgres")


def secure_cluster(data: Path, ca: tls.CertificateAuthority) -> tls.Issued:
    """Give the cluster in ``data`` a certificate from ``ca``, TLS on, plaintext TCP refused."""
    issued = tls.Issued(cert=data / f"{SERVER_NAME}.crt", key=data / f"{SERVER_NAME}.key")
    conf = data / "postgresql.conf"
    if MARKER in conf.read_text():
        return issued
    issued = tls.issue(ca, data, SERVER_NAME)
    for path in (issued.cert, issued.key):
        _own(path)
    issued.key.chmod(0o600)
    settings = {
        "ssl": "on",
        "ssl_cert_file": f"'{issued.cert}'",
        "ssl_key_file": f"'{issued.key}'",
        "ssl_min_protocol_version": "'TLSv1.2'",
    }
    with conf.open("a") as fh:
        fh.write(f"\n{MARKER}\n")
        fh.writelines(f"{k} = {v}\n" for k, v in settings.items())
    hba = data / "pg_hba.conf"
    hba.write_text(_HBA)
    _own(hba)
    return issued


def client_params(ca_cert: Path) -> str:
    """The query string a DSN URL needs to check the server against the stack's CA."""
    return f"sslmode=verify-full&sslrootcert={ca_cert}"
