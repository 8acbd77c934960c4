"""Trace files: the schema mapping, sorting, and a clear error naming the line for bad rows."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from fleet.errors import InvalidInput
from fleet.trace import MAX_DURATION_S, PHILLY, TraceSchema, read_trace
from tests.conftest import SHARED

HEADER = "timestamp,duration,num_gpus,gpu_time,cluster\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_rows_out_of_time_order_are_sorted_and_mapped(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER + "2017-10-09 07:01:55,66.0,1,66.0,11cb48\n"
        "2017-10-09 06:13:03,7200,4,28800,6214e9\n"
        "2017-10-09 06:13:03,0,2,0,6214e9\n",
    )
    jobs = read_trace(path)
    assert [(j.line, j.project, j.count, j.hours) for j in jobs] == [
        (3, "vc-6214e9", 4, 2.0),
        (4, "vc-6214e9", 2, 0.0),
        (2, "vc-11cb48", 1, 66 / 3600),
    ]
    assert jobs[0].submit == 1507529583.0  # 2017-10-09 06:13:03 UTC
    assert [j.line for j in read_trace(path, limit=2)] == [3, 4]


def test_another_trace_loads_through_its_own_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "submitted_s,minutes,gpus,team\n100,30,8,nlp\n50,90,1,vision\n")
    schema = TraceSchema(
        submit="submitted_s",
        duration="minutes",
        gpus="gpus",
        project="team",
        time_format="epoch",
        duration_seconds=60,
        project_prefix="",
    )
    jobs = read_trace(path, schema)
    assert [(j.project, j.submit, j.count, j.hours) for j in jobs] == [
        ("vision", 50.0, 1, 1.5),
        ("nlp", 100.0, 8, 0.5),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        (HEADER, "header but no jobs"),
        ("timestamp,duration,cluster\n2017-10-09 07:01:55,66,a\n", "no column 'num_gpus'"),
        (
            HEADER + "2017-10-09 07:01:55,66,1,66,a\n2017-13-40 07:01:55,66,1,66,a\n",
            ":3: cannot read the time '2017-13-40 07:01:55'",
        ),
        (HEADER + "2017-10-09 07:01:55,-1,1,66,a\n", ":2: column 'duration' must be a duration"),
        (HEADER + "2017-10-09 07:01:55,soon,1,66,a\n", ":2: column 'duration' must be a number"),
        (HEADER + "2017-10-09 07:01:55,nan,1,66,a\n", ":2: column 'duration' must be a finite"),
        # at most a year (MAX_DURATION_S): a 1e300 s job would make every figure meaningless
        (HEADER + "2017-10-09 07:01:55,1e300,1,66,a\n", ":2: column 'duration' .* at most a year"),
        (HEADER + "2017-10-09 07:01:55,1e9,1,66,a\n", ":2: column 'duration' .* at most a year"),
        (
            HEADER + "2017-10-09 07:01:55,31536001,1,66,a\n",
            ":2: .* year .31,536,000., not '31536001'",
        ),
        (HEADER + "2017-10-09 07:01:55,66,0,66,a\n", ":2: column 'num_gpus' must be a whole"),
        (HEADER + "2017-10-09 07:01:55,66,1.5,66,a\n", ":2: column 'num_gpus' must be a whole"),
        (HEADER + "2017-10-09 07:01:55,66,1e308,66,a\n", ":2: column 'num_gpus' .* to 100,000"),
        (HEADER + "2017-10-09 07:01:55,66,1,66,\n", ":2: column 'cluster' is empty"),
        (HEADER + "2017-10-09 07:01:55,66\n", ":2: column 'num_gpus' must be a number"),
        # the project a value makes must be a project name (fleet.names): refused here, not
        # by the first policy to request for it
        (HEADER + "2017-10-09 07:01:55,66,1,66,x y/z\n", ":2: column 'cluster' makes project"),
        (HEADER + "2017-10-09 07:01:55,66,1,66,été\n", ":2: .* 'vc-été': 1-64 letters"),
        (HEADER + '2017-10-09 07:01:55,66,1,66,"a\nb"\n', ":3: .* project 'vc-a\\\\nb'"),
        (HEADER + f"2017-10-09 07:01:55,66,1,66,{'a' * 62}\n", ":2: column 'cluster' makes"),
        # a quote never closed: not the rest of the file read as one value
        (
            HEADER + '2017-10-09 07:01:55,66,1,"66,a\n2017-10-09 07:01:56,66,1,66,b\n',
            ":2: not CSV: unexpected end of data",
        ),
        (HEADER + '2017-10-09 07:01:55,66,1,"66"x,a\n', ":2: not CSV: ',' expected"),
    ],
)
def test_bad_traces_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")) as err:
        read_trace(write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_a_job_of_a_year_loads_and_the_limit_is_in_the_traces_own_unit(tmp_path: Path) -> None:
    jobs = read_trace(write(tmp_path, HEADER + f"2017-10-09 07:01:55,{MAX_DURATION_S},1,66,a\n"))
    assert jobs[0].hours == 365 * 24
    minutes = TraceSchema(duration="minutes", duration_seconds=60)
    head = "timestamp,minutes,num_gpus,cluster\n"
    year = 365 * 24 * 60
    assert read_trace(write(tmp_path, head + f"2017-10-09 07:01:55,{year},1,a\n"), minutes)
    with pytest.raises(InvalidInput, match=r":2: .* at most a year \(525,600\), not '525601'"):
        read_trace(write(tmp_path, head + f"2017-10-09 07:01:55,{year + 1},1,a\n"), minutes)


def test_a_value_as_long_as_a_project_name_allows_loads(tmp_path: Path) -> None:
    jobs = read_trace(write(tmp_path, HEADER + f"2017-10-09 07:01:55,66,1,66,{'a' * 61}\n"))
    assert jobs[0].project == "vc-" + "a" * 61  # 64 characters: the longest project name


def test_a_missing_file_and_a_bad_limit(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read trace"):
        read_trace(tmp_path / "nope.csv")
    with pytest.raises(InvalidInput, match="at least 1"):
        read_trace(write(tmp_path, HEADER + "2017-10-09 07:01:55,66,1,66,a\n"), limit=0)


@pytest.mark.skipif(not (SHARED / "traces" / "philly.csv").exists(), reason="no ../shared")
def test_the_whole_philly_trace_loads() -> None:
    jobs = read_trace(SHARED / "traces" / "philly.csv", PHILLY)
    assert len(jobs) == 82_247
    assert all(a.submit <= b.submit for a, b in itertools.pairwise(jobs))
    assert len({j.project for j in jobs}) == 15 and max(j.count for j in jobs) == 128
    assert max(j.hours for j in jobs) * 3600 < MAX_DURATION_S / 6  # 54 days: well inside a year
