"""What Slurm 22.05's commands print, parsed (fleet/slurm/cluster.py), without a cluster: GRES
strings with commas inside their index lists, node states, time limits in minutes, and a
controller that does not answer (its `--json` output then carries errors, with exit status 0)."""

from __future__ import annotations

import json

import pytest

from fleet.slurm.backend import minutes, ranges
from fleet.slurm.cluster import Gres, Node, Slurm, SlurmError, parse_gres, split_gres


def test_gres_strings_split_outside_parentheses() -> None:
    text = "gpu:a100:0(IDX:N/A),gpu:h100:3(IDX:4-5,7),shard:8"
    assert split_gres(text) == ["gpu:a100:0(IDX:N/A)", "gpu:h100:3(IDX:4-5,7)", "shard:8"]
    assert parse_gres(text) == (Gres("a100", 0, ()), Gres("h100", 3, (4, 5, 7)))
    assert parse_gres("gpu:4(S:0-1)") == (Gres(None, 4, ()),)
    assert parse_gres("(null)") == () == parse_gres(None)


def test_indices_are_written_back_as_slurm_writes_them() -> None:
    assert ranges((7, 4, 5)) == "4-5,7" and ranges((0,)) == "0" and ranges(()) == ""


def test_a_lease_is_whole_minutes_rounded_up() -> None:
    assert [minutes(s) for s in (1, 59.9, 60, 60.5, 3600)] == [1, 1, 1, 2, 60]


def test_drained_down_and_unresponsive_nodes_take_no_new_job() -> None:
    def node(state: str, *flags: str) -> Node:
        return Node("gn1", state, flags, "repairs", ("gpu",), (), ())

    assert node("idle").unusable() is None and node("mixed").unusable() is None
    assert node("idle", "DRAIN").unusable() == "node gn1 is idle drain (repairs)"
    assert node("down").unusable() == "node gn1 is down (repairs)"
    assert node("mixed", "NOT_RESPONDING").unusable() is not None


class Canned(Slurm):
    """Slurm's commands answering what 22.05 printed with the controller down."""

    def run(self, *args: str) -> str:
        errors = [{"description": "Failed while looking for jobs", "source": "slurm_load_jobs"}]
        return json.dumps({"meta": {}, "errors": errors, "jobs": []})


def test_a_controller_that_does_not_answer_is_an_error_not_an_empty_queue() -> None:
    with pytest.raises(SlurmError) as caught:
        Canned().jobs()
    assert str(caught.value) == (
        "Slurm did not answer squeue: Failed while looking for jobs (slurm_load_jobs)"
    )


def test_a_missing_command_is_one_line() -> None:
    with pytest.raises(SlurmError, match="is not installed here"):
        Slurm(5, env={"PATH": "/nonexistent"}).run("squeue-that-is-not-there")
