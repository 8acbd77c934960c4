"""The council's reading of a ledger record: council.record._job builds its PastJob without the
dataclass's __init__ (for speed), so it must build the same one."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from council.record import PastJob, _job
from fleet.models import HistoryRecord, ReleaseReason


@pytest.mark.parametrize("util", [None, 37.5])
def test_a_record_reads_as_the_pastjob_its_constructor_makes(util: float | None) -> None:
    record = HistoryRecord(
        allocation_id="a1",
        thread_id="t1",
        project="p",
        purpose="training",
        gpu_type="A100",
        count=4,
        gpu_ids=["g0", "g1", "g2", "g3"],
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        ended_at=datetime(2026, 1, 1, 6, 30, tzinfo=UTC),
        hours=6.5,
        cost_usd=133.12,
        reason=ReleaseReason.BUDGET,
        mean_util_pct=util,
        hoarded_hours=0.25,
        requested_hours=8.0,
    )
    expected = PastJob(
        ended_at=record.ended_at.timestamp(),
        count=4,
        hours=6.5,
        cost_usd=133.12,
        util_pct=util,
        reason=ReleaseReason.BUDGET,
        fleet_busy=0.375,
        hoarded_hours=0.25,
        lease_hours=8.0,
    )
    job = _job(record, 0.375)
    assert job == expected and hash(job) == hash(expected) and repr(job) == repr(expected)
    assert dataclasses.asdict(job) == dataclasses.asdict(expected)
    assert set(vars(job)) == {f.name for f in dataclasses.fields(PastJob)}  # every field set
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.count = 1  # type: ignore[misc]
