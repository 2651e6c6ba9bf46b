"""The offsets fence on the real stack: when another member moved a partition's stored offset
on (this member is a zombie of a rebalance it has not heard of), the batch of that partition is
dropped, nothing of it is applied, and the member re-seeks to the stored offset.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from structlog.testing import capture_logs

from devtools.apply_support import (
    EventFactory,
    Topics,
    delete_topics,
    fetch_commerce,
    make_topics,
    offsets,
    produce,
    publish_schemas,
    running_apply,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.integration

T = datetime(2025, 3, 1, tzinfo=UTC)


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = make_topics(kafka_bootstrap, partitions=1)
    try:
        yield t
    finally:
        delete_topics(t)


def _user(uid: int) -> dict[str, object]:
    return {
        "id": uid,
        "display_name": f"U{uid}",
        "email": None,
        "phone": None,
        "created_at": T,
        "updated_at": T,
    }


def test_a_zombie_batch_is_fenced_and_the_member_reseeks(commerce: str, topics: Topics) -> None:
    f = EventFactory(topics.prefix, topics.partitions)
    publish_schemas(topics, f)
    settings = settings_for(commerce, topics)
    group = settings.apply.group_id
    data = (f"{topics.prefix}.data", 0)
    produce(
        topics.bootstrap, [f.change("users", "c", _user(i), lsn=100 + i, seq=0) for i in range(10)]
    )
    with capture_logs() as logs, running_apply(settings):
        wait_for(lambda: offsets(commerce, group).get(data) == 10, 60, "the first batch")
        # Another member (after a rebalance this one has not heard of) applied offsets 10-14.
        with psycopg.connect(commerce) as conn:
            conn.execute(
                "UPDATE cutover.consumer_offsets SET next_offset = 15 WHERE group_id = %s",
                (group,),
            )
        produce(
            topics.bootstrap,
            [f.change("users", "c", _user(i), lsn=100 + i, seq=0) for i in range(10, 20)],
        )
        wait_for(lambda: offsets(commerce, group).get(data) == 20, 60, "the re-seek")
    fenced = [e for e in logs if e["event"] == "apply.fenced"]
    assert fenced and fenced[0]["expected"] == 10 and fenced[0]["stored"] == 15
    users = sorted(k[0] for k in fetch_commerce(commerce)["customers"])
    # 10-14 belong to the other member: this one applied none of them.
    assert users == [*range(10), *range(15, 20)]
