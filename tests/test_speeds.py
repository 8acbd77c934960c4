"""A job's own speed on each type (fleet.speeds): the fleet file's [speeds] table and its
checks, the fallback to the type's average, what the project's earlier runs measured (on
SQLite and PostgreSQL), routing by them, and the CLI's entries."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.commands import Commands
from fleet.config import FleetConfig, parse_fleet
from fleet.errors import ConfigError, InvalidInput
from fleet.ledger import Ledger
from fleet.models import GPURequest, ReleaseReason, RouteDecision
from fleet.monitors import new_owner
from fleet.routing import estimate, route
from fleet.simulated import SimulatedFleet
from fleet.speeds import (
    AVERAGE,
    HISTORY,
    TABLE,
    Run,
    job_speeds,
    learned_speeds,
    measured_speeds,
    table_speeds,
)
from fleet.topology import Topology
from fleet.validation import parse_request
from tests.conftest import SMALL_FLEET, run_cli

# On the small fleet H100 is the cheaper type per unit of work on average ($8 / 2 = $4 against
# the A100's $5.12 / 1); for "bert" it is only 1.2 x an A100, so the A100 is cheaper for it.
BERT = "\n[speeds.bert]\na100 = 1.0\nH100 = 1.2\n"
T0 = 1_800_000_000.0


@pytest.fixture
def config() -> FleetConfig:
    return parse_fleet(SMALL_FLEET + BERT)


def test_the_table_speaks_for_its_types_and_the_average_for_the_rest(config: FleetConfig) -> None:
    speeds = table_speeds(config, "bert")
    assert (speeds["A100"].value, speeds["A100"].source) == (1.0, TABLE)  # key's case: any
    assert (speeds["H100"].value, speeds["H100"].source) == (1.2, TABLE)
    assert (speeds["T4"].value, speeds["T4"].source) == (0.15, AVERAGE)
    unknown = table_speeds(config, "resnet")  # a workload the table does not list
    assert all(s.source == AVERAGE for s in unknown.values())
    assert {t: s.value for t, s in table_speeds(config, None).items()} == {
        t: spec.relative_throughput for t, spec in config.catalog.items()
    }


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[speeds.bert]\nK80 = 1.0", "speeds.bert names unknown GPU type 'K80'"),
        (
            "[speeds.bert]\nA100 = 0",
            "speeds.bert.A100: Input should be greater than or equal to 0.001",
        ),
        (
            "[speeds.bert]\nA100 = -2.5",
            "speeds.bert.A100: Input should be greater than or equal to 0.001",
        ),
        ("[speeds.bert]\nA100 = nan", "speeds.bert.A100: Input should be a finite number"),
        ('[speeds.bert]\nA100 = "2"', "speeds.bert.A100: Input should be a valid number"),
        ("[speeds.bert]\nA100 = true", "speeds.bert.A100: Input should be a valid number"),
        ('[speeds."no spaces"]\nA100 = 1', "speeds: workload 'no spaces': 1-64 letters"),
        (
            "[speeds.bert]\nH100 = 1e20",
            "speeds.bert.H100: Input should be less than or equal to 1000",
        ),
    ],
)
def test_a_bad_table_is_one_clear_error(table: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_fleet(SMALL_FLEET + table + "\n")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_workload_name_is_checked_as_a_project_name_is() -> None:
    for bad in ("no spaces", "", "x/y", "a" * 65, "bert\n"):
        with pytest.raises(InvalidInput, match="workload"):
            parse_request({"duration_hours": 1, "workload": bad})
    assert parse_request({"duration_hours": 1, "workload": "resnet-50_bs.64"}).workload


def test_routing_takes_the_type_cheapest_for_the_job_itself(config: FleetConfig) -> None:
    plain = route(GPURequest(duration_hours=2), config, None)
    bert = route(GPURequest(duration_hours=2, workload="bert"), config, None)
    assert isinstance(plain, RouteDecision) and isinstance(bert, RouteDecision)
    assert plain.gpu_type == "H100" and plain.speed_source == AVERAGE
    assert "speed 2 (type average)" in plain.reason
    assert bert.gpu_type == "A100" and (bert.speed, bert.speed_source) == (1.0, TABLE)
    assert "speed 1 (table)" in bert.reason
    h100 = next(o for o in bert.alternatives if o.gpu_type == "H100")
    # its duration is time on the reference type (A100): 2 h x 1.0 / 1.2 on an H100
    assert h100.relative_throughput == 1.2 and math.isclose(h100.est_hours, 2 / 1.2)
    assert estimate(GPURequest(duration_hours=2, workload="bert"), config, "H100") == (
        h100.est_hours,
        h100.est_cost_usd,
    )


def test_history_sets_the_ratio_and_the_table_its_level(config: FleetConfig) -> None:
    measured = {"A100": 2.0, "H100": 8.0}  # work asked per hour taken: padded, H100 4 x A100
    speeds = job_speeds(config, "bert", measured)
    assert speeds["A100"].source == speeds["H100"].source == HISTORY
    assert math.isclose(speeds["H100"].value / speeds["A100"].value, 4.0)
    # level: the geometric mean of table / measured over the measured types
    level = math.sqrt((1.0 / 2.0) * (1.2 / 8.0))
    assert math.isclose(speeds["A100"].value, level * 2.0)
    assert speeds["T4"].source == AVERAGE  # not measured, not in the table
    one_type = job_speeds(config, "bert", {"A100": 0.5})  # no ratio measured: the table
    assert one_type == table_speeds(config, "bert")


def test_a_type_s_measure_is_the_median_of_its_latest_runs() -> None:
    runs = [Run("A100", v) for v in (1.0, 9.0, 2.0, 2.0, 3.0, 100.0, 100.0)]  # newest first
    runs += [Run("H100", 0.0), Run("H100", math.inf), Run("H100", 0.5)]  # 0, inf: nothing
    assert measured_speeds(runs) == {"A100": 2.0, "H100": 0.5}


# ---- learned from the ledger -----------------------------------------------------------------


@pytest.fixture
def ledger(database: str, config: FleetConfig) -> Iterator[Ledger]:
    led = Ledger(database, config)
    yield led
    led.close()


def ran(
    ledger: Ledger,
    tag: str,
    gpu_type: str,
    hours: float,
    *,
    workload: str | None = "bert",
    project: str = "p",
    exit_code: int | None = 0,
    count: int = 1,
    resumes: str | None = None,
    asked: float = 4.0,
) -> str:
    """An allocation of `gpu_type`, `asked` hours asked for, whose `gpu-agent run` command
    ran `hours`, then released."""
    request = GPURequest(
        project=project,
        count=count,
        duration_hours=asked,
        gpu_type=gpu_type,
        request_id=f"r-{tag}",
        workload=workload,
        resumes=resumes,
    )
    decision = route(request, ledger.config, None)
    assert isinstance(decision, RouteDecision)
    inventory = SimulatedFleet(ledger.config).inventory()
    placed = ledger.place(request, decision, tag, T0, inventory, Topology(ledger.config, inventory))
    assert placed.row is not None
    aid, end = placed.row.id, T0 + hours * 3600
    if resumes is not None:  # as the allocate node marks it
        ledger.resume(resumes, aid, T0, T0)
    owner = new_owner("run")
    Commands(ledger).started(aid, owner, T0)
    if exit_code is not None:
        Commands(ledger).ended(aid, owner, end, exit_code)
    ledger.release(aid, ReleaseReason.COMMAND_EXIT, end)
    return aid


def test_only_completed_whole_runs_of_the_same_project_and_workload_count(
    ledger: Ledger,
) -> None:
    assert learned_speeds(ledger, "p", "bert") == {}
    assert learned_speeds(ledger, "p", None) == {}
    ran(ledger, "a1", "A100", 2.0)  # 4 h x speed 1.0 asked, done in 2 h: 2.0
    ran(ledger, "a2", "A100", 4.0, asked=8.0)  # twice the work in twice the time: 2.0
    ran(ledger, "h1", "H100", 0.25, count=2)  # 4 h x 1.2 in 0.25 h: 19.2, whatever the count
    ran(ledger, "h2", "H100", 9.0, exit_code=1)  # failed: measures nothing
    ran(ledger, "h3", "H100", 9.0, exit_code=None)  # never exited (ended with its allocation)
    ran(ledger, "h4", "H100", 9.0, workload="bert2")  # another workload
    ran(ledger, "h5", "H100", 9.0, project="q")  # another project's
    cut = ran(ledger, "h6", "A100", 9.0)
    ran(ledger, "h7", "A100", 9.0, resumes=cut)  # went on from another's checkpoint
    # h6 was resumed by h7 (Ledger.resume marks it), so neither did the whole work
    assert learned_speeds(ledger, "p", "bert") == {"A100": 2.0, "H100": 19.2}
    assert learned_speeds(ledger, "q", "bert") == {"H100": 4 * 1.2 / 9.0}


def test_a_run_that_measures_no_speed_is_dropped_and_history_stays_in_range(
    ledger: Ledger,
) -> None:
    """A command that exits 0 at once did not do the 8 h its request asked for: its measure
    (28,800 x the reference type) is beyond any speed, so no measure; and what history says
    stays within the range a speed may take, however lopsided its runs."""
    ran(ledger, "a1", "A100", 2.0)
    ran(ledger, "h1", "H100", 1 / 3600, asked=8.0)  # 1 s
    assert learned_speeds(ledger, "p", "bert") == {"A100": 2.0}
    speeds = job_speeds(ledger.config, "bert", {"A100": 1e-6, "H100": 1e6})
    assert speeds["A100"].value == 0.001 and speeds["H100"].value == 1000.0


def test_history_routes_where_the_table_would_not(ledger: Ledger) -> None:
    """The table says A100 for bert; this project's runs measured the H100 4.8 x faster."""
    ran(ledger, "a1", "A100", 2.0)
    ran(ledger, "h1", "H100", 0.5)
    request = GPURequest(project="p", duration_hours=2, workload="bert")
    learned = learned_speeds(ledger, "p", "bert")
    decision = route(request, ledger.config, None, learned=learned)
    assert isinstance(decision, RouteDecision)
    assert (decision.gpu_type, decision.speed_source) == ("H100", HISTORY)
    assert "(history)" in decision.reason
    other = route(request.model_copy(update={"project": "q"}), ledger.config, None)
    assert isinstance(other, RouteDecision) and other.gpu_type == "A100"


# ---- through the CLI -------------------------------------------------------------------------


def test_the_cli_routes_by_the_table_and_refuses_a_bad_workload(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SMALL_FLEET + BERT)
    opts = ["--state-dir", str(tmp_path / "state"), "--fleet", str(fleet)]
    ask = ["request", "--project", "p", "--purpose", "training", "--count", "1", "--hours", "1"]
    bad = run_cli(*ask, "--workload", "no spaces", "--json", *opts, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stdout.strip().splitlines()) == 1
    assert "workload 'no spaces'" in json.loads(bad.stdout)["error"]
    assert not (tmp_path / "state" / "ledger.sqlite").exists()  # nothing made, nothing changed
    good = run_cli(*ask, "--workload", "bert", "--no-wait", "--json", *opts, cwd=tmp_path)
    out = json.loads(good.stdout)
    assert good.returncode == 0, good.stderr
    assert out["route"]["gpu_type"] == "A100" and out["route"]["speed_source"] == TABLE
    fleet.write_text(SMALL_FLEET + "[speeds.bert]\nK80 = 1.0\n")
    broken = run_cli(*ask, "--json", *opts, cwd=tmp_path)
    assert broken.returncode == 2 and "unknown GPU type 'K80'" in json.loads(broken.stdout)["error"]
