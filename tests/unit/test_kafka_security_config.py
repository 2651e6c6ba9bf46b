"""The [kafka] security settings: parsed from the file and the environment, validated with
errors naming the setting and the fix, passed to every client, and never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException

from cutover import kafka
from cutover.config import describe, load_settings
from cutover.errors import ConfigError, KafkaAccessError, KafkaError, redact_dsn
from devtools import kafka_security

PASSWORD = "scram-pw-Zq81xv0T"
BASE = '[mapping]\nfile = "m.toml"\n[source]\ndsn = "host=a"\n[target]\ndsn = "host=b"\n'


def _load(tmp_path: Path, kafka_toml: str = "", **env: str) -> object:
    path = tmp_path / "cutover.toml"
    path.write_text(BASE + "[kafka]\n" + kafka_toml)
    return load_settings(path, env)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def test_settings_from_the_file_and_a_password_file(tmp_path: Path, ca: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    settings = _load(
        tmp_path,
        'security_protocol = "SASL_SSL"\nsasl_username = "producer"\n'
        'sasl_password_file = "pw"\nssl_ca_location = "ca.crt"\n',
    )
    k = settings.kafka  # type: ignore[attr-defined]
    assert (k.sasl_username, k.sasl_password) == ("producer", PASSWORD)
    assert k.ssl_ca_location == str(ca)
    assert k.sasl_password_file == str(tmp_path / "pw")
    for purpose in kafka.PRODUCER_PURPOSES:
        conf = kafka.producer_config(k, purpose)
        assert conf["security.protocol"] == "SASL_SSL"
        assert (conf["sasl.mechanism"], conf["sasl.username"]) == ("SCRAM-SHA-512", "producer")
        assert (conf["sasl.password"], conf["ssl.ca.location"]) == (PASSWORD, str(ca))
    for cpurpose in kafka.CONSUMER_PURPOSES:
        conf = kafka.consumer_config(k, cpurpose, group_id="g")
        assert (conf["sasl.password"], conf["security.protocol"]) == (PASSWORD, "SASL_SSL")
    assert kafka.admin_config(k)["sasl.password"] == PASSWORD
    # Never shown: masked in messages, describe() and repr.
    assert PASSWORD not in redact_dsn(f"login with {PASSWORD} failed")
    assert PASSWORD not in str(describe(settings)) + repr(settings)  # type: ignore[arg-type]


def test_the_environment_overrides_the_file(tmp_path: Path, ca: Path) -> None:
    settings = _load(
        tmp_path,
        'sasl_username = "file-user"\n',
        CUTOVER_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        CUTOVER_KAFKA_SASL_USERNAME="env-user",
        CUTOVER_KAFKA_SASL_PASSWORD=PASSWORD,
        CUTOVER_KAFKA_CA=str(ca),
    )
    k = settings.kafka  # type: ignore[attr-defined]
    assert (k.sasl_username, k.sasl_password, k.ssl_ca_location) == ("env-user", PASSWORD, str(ca))


def test_a_pass_through_table_overridden_by_the_typed_settings(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        'security_protocol = "SASL_PLAINTEXT"\nsasl_username = "u"\n'
        f'sasl_password = "{PASSWORD}"\n[kafka.producer]\n"sasl.username" = "other"\n',
    )
    conf = kafka.producer_config(settings.kafka, "cdc")  # type: ignore[attr-defined]
    assert conf["sasl.username"] == "u"


def test_plaintext_adds_nothing_and_keeps_a_pass_through(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[kafka.consumer]\n"security.protocol" = "SSL"\n')
    conf = kafka.consumer_config(settings.kafka, "apply", group_id="g")  # type: ignore[attr-defined]
    assert conf["security.protocol"] == "SSL" and "sasl.password" not in conf


@pytest.mark.parametrize(
    ("toml", "env", "names"),
    [
        ('security_protocol = "SASL_SSL"\n', {}, "sasl_username"),
        ('security_protocol = "SASL_SSL"\nsasl_username = "u"\n', {}, "sasl_password_file"),
        ('sasl_username = "u"\n', {"CUTOVER_KAFKA_SASL_PASSWORD": "x" * 9}, "security_protocol"),
        ('ssl_ca_location = "ca.crt"\n', {}, "security_protocol = SASL_SSL"),
        ('security_protocol = "SSL"\nssl_ca_location = "nope.crt"\n', {}, "nope.crt: no such"),
        ('security_protocol = "SSL"\nssl_key_location = "ca.crt"\n', {}, "go together"),
        ('security_protocol = "TLS"\n', {}, "security_protocol must be one of"),
        ('sasl_mechanism = "GSSAPI"\n', {}, "sasl_mechanism must be one of"),
        (
            'security_protocol = "SASL_SSL"\nsasl_username = "u"\nsasl_password_file = "gone"\n',
            {},
            "sasl_password_file (or CUTOVER_KAFKA_SASL_PASSWORD_FILE) = ",
        ),
        (
            'security_protocol = "SASL_SSL"\nsasl_username = "u"\nsasl_password_file = "pw"\n',
            {"CUTOVER_KAFKA_SASL_PASSWORD": "x" * 9},
            "keep one",
        ),
    ],
)
def test_invalid_security_settings_name_the_setting(
    tmp_path: Path, ca: Path, toml: str, env: dict[str, str], names: str
) -> None:
    (tmp_path / "pw").write_text(PASSWORD)
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, toml, **env)
    assert names in info.value.message
    assert info.value.exit_code == 2


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(ConfigError, match="is empty: write the password"):
        _load(
            tmp_path,
            'security_protocol = "SASL_PLAINTEXT"\nsasl_username = "u"\n'
            'sasl_password_file = "pw"\n',
        )


@pytest.mark.parametrize(
    "code",
    [RdKafkaError.TOPIC_AUTHORIZATION_FAILED, RdKafkaError.GROUP_AUTHORIZATION_FAILED],
)
def test_an_acl_refusal_is_our_access_error_with_the_fix(code: int) -> None:
    err = kafka.translate(KafkaException(RdKafkaError(code)), "producing to shop.users")
    assert isinstance(err, KafkaAccessError) and err.exit_code == 2
    assert "an ACL denies this" in err.message and "sasl_username" in err.message
    other = kafka.translate(KafkaException(RdKafkaError(RdKafkaError._TRANSPORT)), "x")
    assert isinstance(other, KafkaError) and other.exit_code == 3


def test_stack_acls_keep_the_producer_off_the_dead_letters() -> None:
    rows = kafka_security._acls("shop")
    assert ("producer", "TOPIC", "shop.dlq", "LITERAL", "WRITE", "DENY") in rows
    assert not [r for r in rows if r[0] == "producer" and r[4] == "READ"]
    assert not [r for r in rows if r[0] == "producer" and r[1] == "GROUP"]
    applier_groups = {r[2] for r in rows if r[0] == "applier" and r[1] == "GROUP"}
    assert applier_groups == {"cutover-apply"}
    env = kafka_security.env(Path("/s"))
    assert env["CUTOVER_KAFKA_APPLIER_PASSWORD_FILE"] == "/s/secrets/applier"
    assert not [v for v in env.values() if "password=" in v]


def test_a_secured_node_takes_only_sasl_ssl_and_mutual_tls(tmp_path: Path) -> None:
    from devtools import kafka_cluster, stack, tls

    kafka_security.prepare(tmp_path, tls.make_ca(tmp_path / "tls"))
    assert oct((tmp_path / "secrets").stat().st_mode & 0o777) == "0o700"
    for user in (kafka_security.ADMIN, *kafka_security.USERS):
        assert kafka_security.secret_file(tmp_path, user).stat().st_mode & 0o077 == 0
    state = stack.StackState(1, 2, 3, 4, "pw", brokers=3, more_ports=[[5, 6], [7, 8]])
    single = stack._kafka_properties(state, tmp_path / "data")
    for text in (single, kafka_cluster.node_properties(single, state.node_ports(), 2)):
        props = dict(
            line.split("=", 1)
            for line in kafka_security.node_properties(text, tmp_path).splitlines()
        )
        assert "PLAINTEXT://" not in props["listeners"] + props["advertised.listeners"]
        assert props["listener.security.protocol.map"] == "CONTROLLER:SSL,SASL_SSL:SASL_SSL"
        assert props["listener.name.controller.ssl.client.auth"] == "required"
        assert props["allow.everyone.if.no.acl.found"] == "false"
        assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    scram = kafka_security.format_args(tmp_path)
    assert scram.count("--add-scram") == 1 + len(kafka_security.USERS)


def test_a_secured_cluster_node_keeps_the_cluster_settings(tmp_path: Path) -> None:
    """SECURE=1 with BROKERS=3: securing a cluster node's properties keeps its quorum, its
    replication (3, min.insync 2) and puts the brokers' own traffic on SASL_SSL."""
    from devtools import kafka_cluster, stack, tls

    kafka_security.prepare(tmp_path, tls.make_ca(tmp_path / "tls"))
    state = stack.StackState(1, 2, 3, 4, "pw", brokers=3, more_ports=[[5, 6], [7, 8]])
    single = stack._kafka_properties(state, tmp_path / "data")
    text = kafka_cluster.node_properties(single, state.node_ports(), 3)
    props = dict(
        line.split("=", 1) for line in kafka_security.node_properties(text, tmp_path).splitlines()
    )
    for key, value in kafka_cluster.CLUSTER_SETTINGS.items():
        assert props[key] == value, key
    assert props["node.id"] == "3"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:2,2@127.0.0.1:6,3@127.0.0.1:8"
    assert props["listeners"] == "SASL_SSL://127.0.0.1:7,CONTROLLER://127.0.0.1:8"
    assert props["inter.broker.listener.name"] == "SASL_SSL"
    # The brokers' principals (SCRAM admin between brokers, the certificate's CN between
    # controllers) are super users: replication and the quorum need no ACL.
    assert props["super.users"] == "User:admin;User:kafka"
