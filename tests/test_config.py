"""The fleet file: the default loads; every malformed one is one clear line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fleet import config
from fleet.config import SHARE_MAX, SHARE_MIN, load_fleet, parse_fleet
from fleet.errors import ConfigError
from fleet.models import Purpose
from fleet.scheduler import fair_share_factors
from tests.conftest import SMALL_FLEET


def test_default_fleet() -> None:
    config = load_fleet()
    assert set(config.catalog) == {"A100", "H100", "T4", "V100", "RTX4090"}
    assert config.catalog["T4"].price_per_hour == 0.526
    assert config.catalog["V100"].price_per_hour == 2.48
    assert config.catalog["A100"].price_per_hour == 5.12
    assert config.catalog["H100"].price_per_hour == 8.00
    assert config.pools[Purpose.TRAINING] == ["A100", "H100"]
    assert config.pools[Purpose.INFERENCE] == ["T4", "V100"]
    assert config.pools[Purpose.RESEARCH] == ["RTX4090"]


def own_a100(price: str, throughput: str) -> str:
    """The small fleet with an A100 of its own, priced and rated as given (TOML values)."""
    return SMALL_FLEET.replace(
        'catalog = ["A100", "H100", "T4", "RTX4090"]',
        f"[catalog.A100]\nmemory_gb = 80\nprice_per_hour = {price}\n"
        f"relative_throughput = {throughput}",
    )


def own_type(key: str) -> str:
    """A fleet of one type of its own, under the TOML key `key`, in every pool and a node."""
    return (
        f"[catalog.{key}]\nmemory_gb = 24\nprice_per_hour = 1\nrelative_throughput = 1\n"
        f"[pools]\ntraining = [{key}]\ninference = [{key}]\nresearch = [{key}]\n"
        f'[[nodes]]\nname = "n0"\ngpu_type = {key}\ngpus = 1\n'
    )


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[[nodes", "not valid TOML"),
        (SMALL_FLEET.replace("gpus = 4", "gpus = 0", 1), "greater than or equal to 1"),
        (SMALL_FLEET.replace('gpu_type = "T4"', 'gpu_type = "K80"'), "unknown GPU type 'K80'"),
        (SMALL_FLEET.replace('research = ["RTX4090"]', 'research = ["TPU"]'), "unknown GPU type"),
        (SMALL_FLEET.replace('research = ["RTX4090"]', "research = []"), "at least one"),
        (SMALL_FLEET.replace('name = "a100-1"', 'name = "a100-0"'), "appears twice"),
        (
            own_a100("-1", "1"),
            "greater than 0",
        ),
        (SMALL_FLEET.replace('"RTX4090"]', '"GTX480"]', 1), "catalog names 'GTX480', not a type"),
        (SMALL_FLEET.replace('"T4", "RTX4090"]', '"T4", "T4", "RTX4090"]', 1), "a type twice"),
        (SMALL_FLEET + "\n[monitor]\ntick_secnds = 5\n", "tick_secnds"),
        (SMALL_FLEET + '\n[monitor]\nidle_release = "model"\n', "'timeout' or 'stream'"),
        (SMALL_FLEET + '\n[checkpoints]\nkeep = "none"\n', "checkpoints.keep"),
        (SMALL_FLEET + "\n[council]\napprove_threshold = 0.2\n", "deny_threshold"),
        (SMALL_FLEET + "\n[preemption]\nborrow_dearer = true\n", "borrow_dearer needs borrow"),
        ("", "catalog"),
        # an attacker's pass (2026-12-06): values TOML accepts that broke a state directory,
        # divided by zero, hung the simulator or reached the votes as nan
        (SMALL_FLEET + "\n[clock]\ntime_scale = inf\n", "time_scale"),
        (SMALL_FLEET + "\n[clock]\ntime_scale = 1e308\n", "less than or equal to 10000000"),
        (SMALL_FLEET + "\n[monitor]\ntick_seconds = 1e-300\n", "greater than or equal to 0.1"),
        (SMALL_FLEET + "\n[council]\nquorum = 99999999999999999999\n", "quorum"),
        (SMALL_FLEET + "\n[budgets]\nvision = nan\n", "budgets.vision"),
        (SMALL_FLEET + "\n[shares]\nvision = inf\n", "shares.vision"),
        (SMALL_FLEET + "\n[quotas.projects]\nvision = -1\n", "quotas.projects.vision"),
        (
            own_a100("5", "1e-300"),
            "relative_throughput",
        ),
        (
            own_a100("inf", "1"),
            "price_per_hour",
        ),
        # a second pass (2026-12-06, session 23): a speed or price that overflowed into a
        # lease of nothing or a probability of nan, names that forged output lines, types
        # quietly converted, limits no request could meet
        (SMALL_FLEET + "\n[speeds.r]\nH100 = 1e20\n", "less than or equal to 1000"),
        (SMALL_FLEET + "\n[speeds.r]\nA100 = 1e-300\n", "greater than or equal to 0.001"),
        (SMALL_FLEET + "\n[speeds.r]\na100 = 1.0\nA100 = 3.0\n", "names a GPU type twice"),
        (
            own_a100("1e308", "1"),
            "less than or equal to 10000",
        ),
        (SMALL_FLEET.replace('name = "t4-0"', 'name = "t4\\nproblem: FAKE"'), "node 't4\\n"),
        (SMALL_FLEET.replace('rack = "rack-b"', 'rack = "a b"', 1), "nodes: rack 'a b'"),
        (SMALL_FLEET + '\n[budgets]\n"a b" = 5\n', "budgets: project 'a b'"),
        (SMALL_FLEET + '\n[shares]\n"q/q" = 2\n', "shares: project 'q/q'"),
        (SMALL_FLEET + '\n[quotas.projects]\n"zz\\tx" = 2\n', "quotas.projects: project"),
        (SMALL_FLEET.replace("gpus = 4", "gpus = true", 1), "valid integer"),
        (SMALL_FLEET.replace("nvlink = false", 'nvlink = "no"', 1), "valid boolean"),
        (SMALL_FLEET + '\n[council]\nauto_deny = "off"\n', "valid boolean"),
        (SMALL_FLEET + "\n[council]\nquorum = true\n", "valid integer"),
        (
            SMALL_FLEET + "\n[limits]\nmax_duration_hours = 1\nmin_duration_minutes = 120\n",
            "every request would be refused",
        ),
        # a third pass (session 29): shares whose sum overflowed into a division by zero in
        # the fair-share factor, GPU type names that forged output lines
        (SMALL_FLEET + "\n[shares]\nvision = 1e308\nspeech = 1e308\n", "0.001 to 1,000,000"),
        (SMALL_FLEET + "\n[shares]\nvision = 1e-320\n", "shares.vision must be from"),
        (SMALL_FLEET + "\n[shares]\nvision = 0\n", "not 0"),
        (own_type('"X\\nFORGED LINE"'), "catalog: GPU type 'X\\nFORGED LINE'"),
        (own_type('"L4\\u001b[31m"'), "catalog: GPU type 'L4\\x1b[31m'"),
        (own_type('"A 100"'), "catalog: GPU type 'A 100'"),
        # session 30: true and strings read as numbers, a type no request could name, a
        # simulated project's name unchecked
        (SMALL_FLEET + "\n[shares]\nvision = true\n", "shares.vision: Input should be a valid"),
        (SMALL_FLEET + '\n[budgets]\nvision = "5"\n', "budgets.vision: Input should be a valid"),
        (own_a100("true", "1"), "price_per_hour: Input should be a valid number"),
        (SMALL_FLEET + '\n[monitor]\ntick_seconds = "5"\n', "tick_seconds: Input should be"),
        (
            SMALL_FLEET + "\n[council]\nrecord_half_life_days = true\n",
            "record_half_life_days: Input",
        ),
        (SMALL_FLEET + "\n[budgets]\nvision = 1e300\n", "budgets.vision: budget must be an"),
        (own_type('"l4"'), "catalog: GPU type 'l4' must be upper case, 'L4'"),
        (
            SMALL_FLEET + '\n[simulation.workloads]\n"a b" = "train"\n',
            "simulation.workloads: project",
        ),
    ],
)
def test_malformed(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_fleet(text, source="fleet file f.toml")
    assert needle in str(err.value)
    assert str(err.value).startswith("fleet file f.toml: ")
    assert "\n" not in str(err.value)


def test_own_type_loads() -> None:
    """own_type's fleet is valid with a valid name: the cases above fail on the name alone."""
    config = parse_fleet(own_type('"L40S-48GB_V2.1"'))
    assert list(config.catalog) == ["L40S-48GB_V2.1"]
    assert config.nodes[0].gpu_type == "L40S-48GB_V2.1"


SHIPPED_FLEETS = [
    *(Path(config.__file__).parent / "data").glob("*fleet*.toml"),
    *(Path(__file__).parents[1] / "benchmarks").glob("*fleet*.toml"),
    *(Path(__file__).parents[1] / "examples").rglob("*.toml"),
]


@pytest.mark.parametrize("path", SHIPPED_FLEETS, ids=lambda p: p.name)
def test_shipped_fleets_load(path: Path) -> None:
    """Every fleet file the project ships passes the rules above (a name a shipped fleet
    uses that a rule refuses is the rule's fault, not the fleet's)."""
    assert load_fleet(path).catalog


def test_the_widest_shares_give_finite_factors() -> None:
    """At [shares]' bounds the fair-share factor stays a number in [0, 1]: the bounds are what
    keeps its sums and ratios from overflowing or vanishing."""
    shares = {"tiny": SHARE_MIN} | {f"p{i}": SHARE_MAX for i in range(1000)}
    usage = {"tiny": 1e9, "p0": 1e-9}
    factors = fair_share_factors(usage, shares, [*shares, "unnamed"])
    assert len(factors) == 1002
    assert all(math.isfinite(f) and 0 <= f <= 1 for f in factors.values()), factors


def test_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_fleet(tmp_path / "nope.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError):
        load_fleet(binary)
