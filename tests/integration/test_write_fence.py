"""The write fence on a real PostgreSQL 15 (cutover/fence.py): a stray write to a fenced domain
is refused with a clear, retryable error and leaves nothing behind; other domains and the
appliers' sessions (replication origin) still write; raising the fence waits for writers the
guard already admitted, so the fence LSN is past their commits."""

from __future__ import annotations

import secrets
import threading
import time
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cutover import fence

pytestmark = pytest.mark.integration

SCHEMA = "cutover"
PAYMENT = [("shop", "orders"), ("shop", "order_items"), ("shop", "payments"), ("shop", "invoices")]
DATA = [("shop", "users")]


@pytest.fixture
def legacy(fresh_legacy: str) -> str:
    with psycopg.connect(fresh_legacy, autocommit=True) as conn:
        fence.install(conn, SCHEMA, {"payment": PAYMENT, "data": DATA}, side="source")
        # Installing twice changes nothing (init is idempotent).
        fence.install(conn, SCHEMA, {"payment": PAYMENT, "data": DATA}, side="source")
    return fresh_legacy


def _insert_order(conn: psycopg.Connection[object], order_id: int) -> None:
    conn.execute(
        "INSERT INTO shop.orders (id, buyer_id, merchant_id, status, total_idr, created_at, "
        "updated_at) VALUES (%s, 1, 1, 'created', %s, now(), now())",
        [order_id, Decimal("10.00")],
    )


def _count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM shop.{table}").fetchone()
    assert row is not None
    return int(row[0])


def test_a_stray_write_to_a_fenced_domain_is_refused_and_leaves_nothing(legacy: str) -> None:
    with psycopg.connect(legacy, autocommit=True) as admin:
        fence.raise_fence(admin, SCHEMA, "payment", state="writes_switched", reason="t", side="s")
        states = fence.fence_states(admin, SCHEMA, side="source")
    assert states["payment"].fenced and states["payment"].fence_lsn is not None
    assert not states["data"].fenced

    with psycopg.connect(legacy) as app:
        with pytest.raises(psycopg.Error) as caught, app.transaction():
            app.execute(
                "INSERT INTO shop.users (id, handle, display_name, email, phone, "
                "follower_count, bio, created_at, updated_at) VALUES "
                "(1, 'h', 'n', 'e', 'p', 0, 'b', now(), now())"
            )
            _insert_order(app, 1)  # refused: the whole transaction goes
        err = caught.value
        assert fence.is_fence_refusal(err)
        assert err.sqlstate == "25006"
        assert "shop.orders" in str(err) and "payment" in str(err) and "writes_switched" in str(err)
        for statement in (
            "UPDATE shop.payments SET status = 'settled'",
            "DELETE FROM shop.invoices",
            "TRUNCATE shop.order_items",
        ):
            with pytest.raises(psycopg.Error) as again:
                app.execute(statement)
            app.rollback()
            assert fence.is_fence_refusal(again.value), statement
    assert _count(legacy, "orders") == 0
    assert _count(legacy, "users") == 0  # nothing half-written: the users row went with it

    # Another domain is not fenced.
    with psycopg.connect(legacy, autocommit=True) as app:
        app.execute(
            "INSERT INTO shop.users (id, handle, display_name, email, phone, follower_count, "
            "bio, created_at, updated_at) VALUES (2, 'h2', 'n', 'e', 'p', 0, 'b', now(), now())"
        )
    assert _count(legacy, "users") == 1


def test_an_applier_session_with_a_replication_origin_passes_the_fence(legacy: str) -> None:
    with psycopg.connect(legacy, autocommit=True) as admin:
        fence.raise_fence(admin, SCHEMA, "payment", state="writes_switched", reason="t", side="s")
        admin.execute("SELECT pg_replication_origin_create('cutover_fence_test')")
    try:
        with psycopg.connect(legacy, autocommit=True) as applier:
            applier.execute("SELECT pg_replication_origin_session_setup('cutover_fence_test')")
            _insert_order(applier, 7)
        assert _count(legacy, "orders") == 1
    finally:
        with psycopg.connect(legacy, autocommit=True) as admin:
            admin.execute("SELECT pg_replication_origin_drop('cutover_fence_test')")


def test_a_narrowed_fence_lets_the_social_app_update_its_own_columns(fresh_legacy: str) -> None:
    """shop.users holds buyer data (moved with the data domain) and the social profile (stays on
    legacy): with the fence narrowed to the moved columns, the social app keeps updating handle,
    bio and follower_count, while a write to a moved column, an INSERT or a DELETE is refused."""
    moved = ["display_name", "email", "phone", "created_at", "updated_at"]
    with psycopg.connect(fresh_legacy, autocommit=True) as admin:
        fence.install(admin, SCHEMA, {"data": DATA}, side="source", update_columns={DATA[0]: moved})
        admin.execute(
            "INSERT INTO shop.users (id, handle, display_name, email, phone, follower_count, "
            "bio, created_at, updated_at) VALUES (1, 'h', 'n', 'e', 'p', 0, 'b', now(), now())"
        )
        fence.raise_fence(admin, SCHEMA, "data", state="writes_switched", reason="t", side="s")
    with psycopg.connect(fresh_legacy, autocommit=True) as app:
        app.execute("UPDATE shop.users SET bio = 'new bio', follower_count = 5 WHERE id = 1")
        for statement in (
            "UPDATE shop.users SET email = 'x@y' WHERE id = 1",
            "UPDATE shop.users SET bio = 'b2', display_name = 'n2' WHERE id = 1",
            "INSERT INTO shop.users (id, handle, display_name, email, phone, follower_count, bio,"
            " created_at, updated_at) VALUES (2, 'h2', 'n', 'e', 'p', 0, 'b', now(), now())",
            "DELETE FROM shop.users WHERE id = 1",
        ):
            with pytest.raises(psycopg.Error) as refused:
                app.execute(statement)
            assert fence.is_fence_refusal(refused.value), statement
        row = app.execute("SELECT bio, follower_count, email FROM shop.users").fetchall()
    assert row == [("new bio", 5, "e")]
    # Installing again without the narrowing fences the whole table (the UPDATE trigger goes).
    with psycopg.connect(fresh_legacy, autocommit=True) as admin:
        fence.install(admin, SCHEMA, {"data": DATA}, side="source")
    with psycopg.connect(fresh_legacy, autocommit=True) as app, pytest.raises(psycopg.Error):
        app.execute("UPDATE shop.users SET bio = 'again' WHERE id = 1")


def test_lowering_the_fence_lets_writes_through_again(legacy: str) -> None:
    with psycopg.connect(legacy, autocommit=True) as admin:
        fence.raise_fence(admin, SCHEMA, "payment", state="writes_switched", reason="t", side="s")
        fence.lower_fence(admin, SCHEMA, "payment", state="reads_switched", side="source")
    with psycopg.connect(legacy, autocommit=True) as app:
        _insert_order(app, 3)
    assert _count(legacy, "orders") == 1


def test_raising_the_fence_waits_for_writers_already_admitted(legacy: str) -> None:
    writer = psycopg.connect(legacy)
    _insert_order(writer, 5)  # admitted: holds FOR SHARE on the fence row, not committed yet
    fenced_at: list[float] = []
    lsn: list[int] = []

    def fence_it() -> None:
        with psycopg.connect(legacy, autocommit=True) as admin:
            lsn.append(
                fence.raise_fence(
                    admin, SCHEMA, "payment", state="writes_switched", reason="t", side="source"
                )
            )
        fenced_at.append(time.monotonic())

    thread = threading.Thread(target=fence_it)
    thread.start()
    time.sleep(1.0)
    assert not fenced_at, "the fence went up while an admitted writer was still open"
    committed_at = time.monotonic()
    row = writer.execute("SELECT 1").fetchone()
    assert row is not None
    writer.commit()
    writer.close()
    thread.join(timeout=30)
    assert fenced_at and fenced_at[0] >= committed_at
    assert len(lsn) == 1
    assert _count(legacy, "orders") == 1  # the admitted write is kept


def test_fence_states_of_a_database_without_a_fence_are_empty(fresh_legacy: str) -> None:
    with psycopg.connect(fresh_legacy, autocommit=True) as conn:
        assert fence.fence_states(conn, SCHEMA, side="source") == {}


def test_raise_and_lower_are_in_the_wal_and_logged_at_their_message(legacy: str) -> None:
    """The producer's evidence: a transactional ``cutover.fence`` message in the transaction that
    flips the row, logged at the message's LSN, and :func:`fence.fenced_at` answers per position."""
    slot = "fence_log_test"
    with psycopg.connect(legacy, autocommit=True) as admin:
        admin.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [slot])
        try:
            start = _lsn(admin)
            fence.raise_fence(
                admin, SCHEMA, "payment", state="writes_switched", reason="t", side="s"
            )
            raised = _lsn(admin)
            fence.lower_fence(admin, SCHEMA, "payment", state="reads_switched", side="source")
            lowered = _lsn(admin)
            messages = admin.execute(
                "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL) "
                "WHERE data LIKE 'message:%%'",
                [slot],
            ).fetchall()
        finally:
            admin.execute("SELECT pg_drop_replication_slot(%s)", [slot])
        log = admin.execute(
            "SELECT domain, fenced FROM cutover.write_fence_log ORDER BY lsn"
        ).fetchall()
        at = [fence.fenced_at(admin, SCHEMA, p, side="source") for p in (start, raised, lowered)]
    fence_messages = [m[0] for m in messages if "prefix: cutover.fence," in m[0]]
    assert len(fence_messages) == 2, messages
    assert all("transactional: 1" in m for m in fence_messages)
    assert '"fenced": true' in fence_messages[0] and '"fenced": false' in fence_messages[1]
    assert any("prefix: cutover.fence.lsn," in m[0] for m in messages)
    assert log == [("payment", True), ("payment", False)]
    assert at == [frozenset(), frozenset({"payment"}), frozenset()]


def _lsn(conn: psycopg.Connection[tuple[int]]) -> int:
    row = conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
    assert row is not None
    return int(row[0])


def test_a_fence_installed_without_its_log_counts_as_not_installed(legacy: str) -> None:
    """An older release's fence (no write_fence_log): the gate fails closed until init runs."""
    with psycopg.connect(legacy, autocommit=True) as conn:
        conn.execute("DROP TABLE cutover.write_fence_log")
        assert fence.fence_states(conn, SCHEMA, side="source") == {}
        fence.install(conn, SCHEMA, {"payment": PAYMENT, "data": DATA}, side="source")
        assert set(fence.fence_states(conn, SCHEMA, side="source")) == {"payment", "data"}


def test_an_application_role_needs_no_right_on_the_fence_and_cannot_lower_it(
    legacy: str,
) -> None:
    """The guard reads and locks the fence row with its owner's rights (SECURITY DEFINER): an
    application role with rights on its tables only is admitted, then refused once the fence
    is up, and may not touch the fence itself."""
    role = f"app_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    with psycopg.connect(legacy, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA shop TO {}").format(sql.Identifier(role)))
        admin.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE ON shop.orders TO {}").format(
                sql.Identifier(role)
            )
        )
    params = conninfo_to_dict(legacy)
    params.update(user=role, password=password)
    as_app = make_conninfo(**params)  # type: ignore[arg-type]
    try:
        with psycopg.connect(as_app, autocommit=True) as app:
            _insert_order(app, 1)  # not fenced: admitted, with no right on the fence
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("UPDATE cutover.write_fence SET fenced = false")
        with psycopg.connect(legacy, autocommit=True) as admin:
            fence.raise_fence(
                admin, SCHEMA, "payment", state="writes_switched", reason="t", side="s"
            )
        with psycopg.connect(as_app, autocommit=True) as app:
            with pytest.raises(psycopg.Error) as refused:
                _insert_order(app, 2)
            assert fence.is_fence_refusal(refused.value), refused.value
        assert _count(legacy, "orders") == 1
    finally:
        with psycopg.connect(legacy, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
