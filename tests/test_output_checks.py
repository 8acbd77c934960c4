"""What `simulate`, `council train` and `analyze` write is checked before any work: a place
they cannot write is one line on stderr (a JSON error with --json), exit 2, and nothing
written; a trace value that makes no project name and a --models file with more than
[speeds] tables are refused the same way."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from fleet.config import parse_fleet
from fleet.errors import InvalidInput
from sim.analysis import analyze
from sim.analysis.history import load_history
from sim.analysis.plots import write_plots
from sim.simulate import POLICIES, simulate, with_models
from tests.conftest import run_cli

HEADER = "timestamp,duration,num_gpus,gpu_time,cluster\n"
BASE = resources.files("fleet").joinpath("data", "default_fleet.toml")
TRAIN = ("council", "train", "--worlds", "3", "--days", "7", "--steps", "1", "--no-ablations")


def _trace(tmp_path: Path, cluster: str = "ab") -> Path:
    path = tmp_path / "t.csv"
    path.write_text(
        HEADER + f"2017-10-09 07:01:55,600,1,5,{cluster}\n2017-10-09 07:02:55,900,2,5,cd\n"
    )
    return path


def _tree(path: Path) -> list[str]:
    """Every path under `path` (with `path` itself): what a refused command must leave."""
    if not path.exists():
        return []
    return sorted(str(p) for p in [path, *path.rglob("*")])


def simulating(
    tmp_path: Path, out: Path | str, *extra: str, trace: Path | None = None, policies: str = "naive"
) -> subprocess.CompletedProcess[str]:
    """`gpu-agent simulate --json` of a small trace into `out`."""
    trace = _trace(tmp_path) if trace is None else trace
    args = ["--trace", str(trace), *extra, "--out", str(out), "--policies", policies, "--json"]
    return run_cli("simulate", *args, cwd=tmp_path)


def refused(r: subprocess.CompletedProcess[str], says: str) -> None:
    """One line on stderr saying `says`, exit 2, and the same line as JSON on stdout."""
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    error = json.loads(r.stdout)
    assert error["exit_code"] == 2 and error["type"] and says in error["error"]


def test_a_trace_value_that_makes_no_project_name_is_refused_before_any_policy(
    tmp_path: Path,
) -> None:
    trace = _trace(tmp_path, "x y/z")
    out = tmp_path / "o"
    r = simulating(tmp_path, out, trace=trace, policies="naive,gpu-agent")
    refused(r, f"{trace}:2: column 'cluster' makes project 'vc-x y/z'")
    assert not out.exists()


@pytest.mark.parametrize(
    ("fleet_edit", "says"),
    [
        ('\n[simulation]\ndefault_workload = "bogus"\n', "simulation workload 'bogus' is unknown"),
        (None, "the simulated fleet needs [[nodes]]"),
    ],
)
def test_a_fleet_no_simulation_can_run_on_is_refused_before_a_policys_folder_is_touched(
    tmp_path: Path, fleet_edit: str | None, says: str
) -> None:
    """A fleet file SimulatedFleet refuses (no nodes, a workload no profile plays) is refused
    before the first policy runs: the earlier run's results under --out stay as they were,
    not freshened for a run that stops at its gpu-agent policy."""
    out = tmp_path / "s"
    assert simulating(tmp_path, out, policies="naive,gpu-agent").returncode == 0
    before = {p: p.read_bytes() for p in map(Path, _tree(out)) if p.is_file()}
    text = BASE.read_text()
    text = text + fleet_edit if fleet_edit else text[: text.index("[[nodes]]")]
    fleet = tmp_path / "bad.toml"
    fleet.write_text(text)
    refused(simulating(tmp_path, out, "--fleet", str(fleet), policies="naive,gpu-agent"), says)
    assert {p: p.read_bytes() for p in map(Path, _tree(out)) if p.is_file()} == before


@pytest.mark.parametrize(
    "blocked", ["report.md", "jct.png", "naive", "gpu-agent/ledger.sqlite", "gpu-agent/fleet.toml"]
)
def test_simulate_refuses_an_out_it_cannot_fill_before_the_run(
    tmp_path: Path, blocked: str
) -> None:
    """A folder where a file goes, a file where a policy's folder goes."""
    out = tmp_path / "s"
    if blocked in POLICIES:
        out.mkdir()
        (out / blocked).write_text("")
    else:
        (out / blocked).mkdir(parents=True)
    before = _tree(out)
    r = simulating(tmp_path, out, policies="naive,gpu-agent")
    refused(r, f"--out {out}: {out / blocked} is ")
    assert _tree(out) == before


def test_simulate_takes_what_it_removes_first_and_refuses_links_to_nothing(
    tmp_path: Path,
) -> None:
    """A read-only fleet.toml a policy's folder kept is removed before it is written, as
    before the check: no refusal. A link to nothing as --out, or where a report file goes,
    is refused before the run."""
    out = tmp_path / "s"
    (out / "naive").mkdir(parents=True)
    (out / "naive" / "fleet.toml").write_text("")
    (out / "naive" / "fleet.toml").chmod(0o444)
    done = simulating(tmp_path, out)
    assert done.returncode == 0, done.stderr
    nowhere = tmp_path / "dangling"
    nowhere.symlink_to(tmp_path / "absent")
    refused(simulating(tmp_path, nowhere), "is a link to nothing")
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(tmp_path / "absent")
    refused(simulating(tmp_path, out), "report.md is a link to nothing")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc")
def test_simulate_refuses_a_folder_no_file_can_be_made_in(tmp_path: Path) -> None:
    """/proc/self: a folder os.access calls writable for root; a probe file says otherwise."""
    refused(simulating(tmp_path, "/proc/self"), "--out /proc/self: cannot write in /proc/self")


def test_simulate_writes_under_a_place_that_changed_since_the_check_in_one_line(
    tmp_path: Path,
) -> None:
    """The last resort: simulate() itself, unchecked, turns the OSError into one line."""
    out = tmp_path / "s"
    (out / "metrics.json").mkdir(parents=True)
    text = BASE.read_text("utf-8")
    with pytest.raises(InvalidInput, match=f"--out {out}: cannot write") as err:
        simulate(_trace(tmp_path), ["naive"], parse_fleet(text), "base", out, fleet_text=text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("blocked", ["council.pt", "MODEL_CARD.md"])
def test_council_train_refuses_an_out_it_cannot_fill_before_training(
    tmp_path: Path, blocked: str
) -> None:
    out = tmp_path / "ct"
    (out / blocked).mkdir(parents=True)
    before = _tree(out)
    r = run_cli(*TRAIN, "--out", str(out), "--json", cwd=tmp_path)
    refused(r, f"--out {out}: {out / blocked} is not a regular file")
    assert _tree(out) == before


def test_council_train_refuses_a_folder_no_file_can_be_made_in(tmp_path: Path) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    r = run_cli(*TRAIN, "--out", "/proc/self/ct", "--json", cwd=tmp_path)
    refused(r, "--out /proc/self/ct: cannot write in /proc/self")


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gpu-agent state directory with a few allocations in its ledger."""
    root = tmp_path_factory.mktemp("history")
    text = BASE.read_text("utf-8")
    simulate(_trace(root), ["gpu-agent"], parse_fleet(text), "base", root / "run", fleet_text=text)
    return root / "run" / "gpu-agent"


def test_analyze_refuses_a_plots_folder_it_cannot_fill(history: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    (out / "queueing_delay.png").mkdir(parents=True)
    before = _tree(out)
    r = run_cli("analyze", "--state-dir", str(history), "--out", str(out), "--json", cwd=tmp_path)
    refused(r, f"--out {out}: {out / 'queueing_delay.png'} is not a regular file")
    assert _tree(out) == before
    if Path("/proc/self").is_dir():
        r = run_cli(
            "analyze", "--state-dir", str(history), "--out", "/proc/self", "--json", cwd=tmp_path
        )
        refused(r, "--out /proc/self: cannot write in /proc/self")


def test_analyze_of_no_ledger_says_so_before_any_plots_folder(tmp_path: Path) -> None:
    """A wrong --state-dir is the error, not the plots folder it would have held."""
    r = run_cli("analyze", "--state-dir", str(tmp_path / "nope"), "--json", cwd=tmp_path)
    refused(r, "no ledger at")
    assert not (tmp_path / "nope").exists()


def test_analyze_checks_its_default_plots_folder_too(history: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(history, state)
    (state / "analysis" / "idle_hoarded.png").mkdir(parents=True)
    before = _tree(state / "analysis")
    r = run_cli("analyze", "--state-dir", str(state), "--json", cwd=tmp_path)
    refused(r, "idle_hoarded.png is not a regular file")
    assert _tree(state / "analysis") == before


def test_write_plots_turns_an_oserror_into_one_line(history: Path, tmp_path: Path) -> None:
    """The last resort, where the place changed after the command's check."""
    hist, config = load_history(history)
    out = tmp_path / "plots"
    (out / "demand_by_gpu_type.png").mkdir(parents=True)
    with pytest.raises(InvalidInput, match="cannot write plot") as err:
        write_plots(analyze(hist, config), out)
    assert "\n" not in str(err.value)


MODELS = {
    "[council]\nauto_approve_max_gpus = 1000\n[speeds.x]\nA100 = 1\n": "not 'council'",
    "A100 = 2\n[speeds.x]\nA100 = 1\n": "not 'A100'",  # it would join the last [[nodes]]
    "[speeds.x]\nA100 = 5000\n": "speeds.x.A100: Input should be less than or equal to 1000",
}


@pytest.mark.parametrize("text", MODELS)
def test_a_models_file_holds_only_speeds_and_they_are_checked_as_a_fleet_files(
    tmp_path: Path, text: str
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(text)
    out = tmp_path / "o"
    r = simulating(tmp_path, out, "--fleet", str(BASE), "--models", str(models))
    refused(r, MODELS[text])
    assert str(models) in r.stderr and not out.exists()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("speeds.x = 1\n", "not 'speeds.x'"),
        ("speeds = 3\n", "not 'speeds'"),
        ("[speeds.x]\nA100 = 'fast'\n", "speeds.x.A100: Input should be a valid number"),
        ("[speeds.x]\nB200 = 1\n", "speeds.x names unknown GPU type 'B200'"),
        ('[speeds."a b"]\nA100 = 1\n', "speeds: workload 'a b'"),
        ("[speeds.x\n", "not valid TOML"),
    ],
)
def test_more_models_files_refused(tmp_path: Path, text: str, says: str) -> None:
    models = tmp_path / "models.toml"
    models.write_text(text)
    with pytest.raises(InvalidInput, match=re.escape(says)) as err:
        name, merged = with_models("base", BASE.read_text("utf-8"), str(models))
        parse_fleet(merged, source=name)  # as `simulate` checks it
    assert "\n" not in str(err.value)


def test_models_speeds_merge_as_data(tmp_path: Path) -> None:
    """The models' tables join the fleet's [speeds]; nothing else of the fleet changes, and
    a workload the fleet file already has is refused."""
    models = tmp_path / "models.toml"
    models.write_text('[speeds."lm"]\nA100 = 1\nt4 = 0.25\n[speeds.cnn]\nH100 = 2\n')
    text = BASE.read_text("utf-8")
    name, merged = with_models("base", text, str(models))
    assert name == f"base + {models}"
    got, base = parse_fleet(merged), parse_fleet(text)
    assert got.speeds == {"lm": {"A100": 1.0, "T4": 0.25}, "cnn": {"H100": 2.0}}
    assert got.model_copy(update={"speeds": {}}) == base
    again = tmp_path / "again.toml"
    again.write_text("[speeds.lm]\nA100 = 1\n")
    with pytest.raises(InvalidInput, match=r"\[speeds.lm\] is in the fleet file too"):
        with_models("merged", merged, str(again))
    inline = "speeds = { train = { A100 = 1.0 } }\n" + text  # the fleet's own: one table
    with pytest.raises(InvalidInput, match=r"write them as \[speeds.WORKLOAD\] tables"):
        with_models("inline", inline, str(models))


def test_a_run_where_no_job_completes_writes_its_report_without_a_warning(
    tmp_path: Path,
) -> None:
    """A trace whose one job asks for more GPUs than the fleet has completes nothing: the
    completion-time plot says so, where a legend of no line warned on the terminal."""
    trace = tmp_path / "big.csv"
    trace.write_text(HEADER + "2017-10-09 07:01:55,600,1024,1,abc\n")
    r = simulating(tmp_path, tmp_path / "s", trace=trace)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "legend" not in r.stderr, r.stderr
    assert (tmp_path / "s" / "jct.png").is_file()
