"""The fault campaign: its checks on hand-made observations, and a short seeded budget.

The checks (:func:`convergence_problems`, :func:`overlapping_pairs`) are pure and tested
on observations built here, so each one is shown to fail when it should. The budget runs
the real campaign (daemon process, grpcio kubelet and PodResources stand-ins, REST) for
a few dozen seeded steps on each FM backend and fails on any violation, printing each
with its step, seed and a replayable script (``benchmarks/faults.py --script``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testkit.faults import (
    AllocationSpec,
    CampaignSettings,
    Model,
    Observation,
    Pod,
    Step,
    Table,
    convergence_problems,
    device,
    overlapping_pairs,
    parse_script,
    resource,
    run_campaign,
)

TABLE = Table.of("hgx-h200")
BUDGET_STEPS = 60
SEEDS = {"simulator": 7, "fmpm": 11}


def rest_view(
    active: set[int], held: set[int], *, overrides: dict[int, dict[str, Any]] | None = None
) -> tuple[dict[str, Any], ...]:
    """GET /v1/partitions as a converged daemon answers it for these facts."""
    occupied = active | held
    rows = []
    for pid in sorted(TABLE.modules):
        blocker = next((o for o in sorted(occupied) if TABLE.overlap(pid, o)), None)
        if pid in held:
            state = "allocated"
        elif blocker is not None:
            state = "blocked"
        else:
            state = "ready" if pid in active else "free"
        row = {
            "id": pid,
            "state": state,
            "phase": "active" if pid in active else "inactive",
            "in_use": pid in held,
            "healthy": state in ("allocated", "ready", "free"),
            "blocked_by": blocker if state == "blocked" else None,
            "fault": None,
        }
        row.update((overrides or {}).get(pid, {}))
        rows.append(row)
    return tuple(rows)


def observation(
    active: set[int], held: set[int], **changes: Any
) -> tuple[Observation, tuple[dict[str, Any], ...]]:
    partitions = changes.pop("partitions", None) or rest_view(active, held)
    kubelet = {
        resource(size): {
            device(int(p["id"])): "Healthy" if p["healthy"] else "Unhealthy"
            for p in partitions
            if TABLE.size(int(p["id"])) == size
        }
        for size in TABLE.sizes()
    }
    seen = Observation(
        fm_active=frozenset(active),
        fm_awaiting_set_activated=changes.pop("awaiting", False),
        rest_partitions=partitions,
        readyz_status=changes.pop("readyz", 200),
        kubelet=changes.pop("kubelet", kubelet),
        streams=changes.pop("streams", {resource(s): True for s in TABLE.sizes()}),
    )
    return seen, partitions


def model_holding(*pids: int) -> Model:
    model = Model()
    for pid in pids:
        name = f"pod-{pid}"
        model.pods[name] = Pod(name, resource(TABLE.size(pid)), ((device(pid),),), frozenset({pid}))
    return model


def test_overlapping_pairs_are_found_and_disjoint_ones_are_not() -> None:
    assert overlapping_pairs(TABLE, {3, 4, 5, 6}) == []
    assert overlapping_pairs(TABLE, {1, 3, 8}) == [(1, 3), (1, 8)]
    assert overlapping_pairs(TABLE, {0, 14}) == [(0, 14)]


def test_a_converged_node_has_no_problems() -> None:
    seen, _ = observation({1, 5}, {1})
    model = model_holding(1)
    model.prewarmed.add(5)
    assert convergence_problems(TABLE, model, seen, now=0.0) == []


@pytest.mark.parametrize(
    ("active", "held", "prewarmed", "change", "expected"),
    [
        # Stuck in flight (a cancelled Allocate's later entry).
        ({9}, {9}, set(), {8: {"state": "activating", "phase": "activating"}}, "is activating"),
        # Blocked by a partition nothing occupies.
        (set(), set(), set(), {3: {"state": "blocked", "blocked_by": 9, "healthy": False}},
         "blocked by 9"),
        # Unhealthy without a cause left (no drain, no failed activation).
        (set(), set(), set(), {6: {"state": "unhealthy", "healthy": False, "fault": "x"}},
         "no cause left"),
        # Offered to the kubelet while an overlapping partition is held.
        ({1}, {1}, set(), {3: {"state": "free", "healthy": True, "blocked_by": None}},
         "is offered"),
        # REST says in use, no pod holds it.
        ({2}, set(), {2}, {2: {"in_use": True, "state": "allocated"}}, "in_use=True"),
    ],
)  # fmt: skip
def test_each_kind_of_divergence_is_a_problem(
    active: set[int],
    held: set[int],
    prewarmed: set[int],
    change: dict[int, dict[str, Any]],
    expected: str,
) -> None:
    model = model_holding(*held)
    model.prewarmed |= prewarmed
    seen, _ = observation(active, held, partitions=rest_view(active, held, overrides=change))
    problems = convergence_problems(TABLE, model, seen, now=0.0)
    assert any(expected in p for p in problems), problems


def test_fm_facts_the_model_does_not_explain_are_problems() -> None:
    # Active in FM, held by no pod, not pre-warmed (a claim nobody released).
    seen, _ = observation({7}, set())
    assert any("held by no pod" in p for p in convergence_problems(TABLE, Model(), seen, 0.0))
    # Held by a pod but inactive in FM.
    seen, _ = observation(set(), set())
    problems = convergence_problems(TABLE, model_holding(4), seen, 0.0)
    assert any("held by pod pod-4 is inactive" in p for p in problems), problems
    # Overlapping partitions both active.
    seen, _ = observation({1, 3}, set())
    model = Model(prewarmed={1, 3})
    assert any("overlap" in p for p in convergence_problems(TABLE, model, seen, 0.0))


def test_serving_problems_are_problems() -> None:
    seen, _ = observation(set(), set(), readyz=503)
    assert convergence_problems(TABLE, Model(), seen, 0.0) == ["/readyz answers 503"]
    streams = {resource(s): s != 2 for s in TABLE.sizes()}
    seen, _ = observation(set(), set(), streams=streams)
    problems = convergence_problems(TABLE, Model(), seen, 0.0)
    assert problems == ["nvidia.com/gpu-h200-2x has no live ListAndWatch registration"]
    seen, _ = observation(set(), set(), kubelet={})
    assert len(convergence_problems(TABLE, Model(), seen, 0.0)) == len(TABLE.modules)


def test_drains_and_recent_failed_activations_explain_unhealthy_partitions() -> None:
    sick = {6: {"state": "unhealthy", "healthy": False, "fault": "activation failed"}}
    seen, _ = observation(set(), set(), partitions=rest_view(set(), set(), overrides=sick))
    held_out = Model(hold_until={6: 10.0})
    assert convergence_problems(TABLE, held_out, seen, now=5.0) == []
    assert convergence_problems(TABLE, held_out, seen, now=11.0) != []
    assert convergence_problems(TABLE, Model(drained={8}), seen, now=0.0) == []


def test_steps_print_as_a_script_that_parses_back() -> None:
    steps = [
        Step("allocate", str(AllocationSpec(1, (("partition-7", "partition-8"),), 0.5))),
        Step("fm", "slow-activation=2"),
        Step("allocate-dup", "2x:partition-6|partition-6"),
        Step("settle"),
    ]
    text = ";".join(str(s) for s in steps)
    assert text == (
        "allocate=1x:partition-7,partition-8@0.5;fm=slow-activation=2;"
        "allocate-dup=2x:partition-6|partition-6;settle"
    )
    assert parse_script(text) == steps
    spec = AllocationSpec.parse("2x:partition-6|partition-6")
    assert spec.containers == (("partition-6",), ("partition-6",))


def test_bad_scripts_are_refused_with_the_accepted_forms() -> None:
    with pytest.raises(ValueError, match="unknown step kind 'explode'"):
        parse_script("settle;explode")
    with pytest.raises(ValueError, match="expected SIZEx:ID"):
        AllocationSpec.parse("partition-3")


@pytest.mark.parametrize("backend", ["simulator", "fmpm"])
def test_a_short_seeded_campaign_finds_no_violation(tmp_path: Path, backend: str) -> None:
    result = run_campaign(tmp_path, backend, SEEDS[backend], BUDGET_STEPS)
    assert result.steps >= BUDGET_STEPS
    assert sum(result.faults.values()) > 0
    assert result.convergence_s, "no settle measured convergence"
    assert not result.violations, "\n".join(str(v) for v in result.violations)


def test_a_real_run_that_breaks_a_bound_reports_it_with_its_script(tmp_path: Path) -> None:
    # A bound no node can meet (no time at all to converge): the settle's measured
    # convergence must come back as a violation, so the budget above can fail.
    impossible = CampaignSettings(reconcile_s=1.0, grace_s=2.0, slack_s=-3.0)
    script = parse_script("allocate=1x:partition-9;settle")
    result = run_campaign(tmp_path, "simulator", 1, 0, script=script, settings=impossible)
    assert result.steps == 2
    (violation,) = result.violations
    assert violation.check == "convergence" and "converged only after" in violation.detail
    assert violation.trail == ("allocate=1x:partition-9", "settle")
    assert "steps since the last settle: allocate=1x:partition-9;settle" in str(violation)


def test_floods_sighup_and_huge_requests_leave_no_violation(tmp_path: Path) -> None:
    # Issue 16's fault kinds, scripted so each runs whatever the seed draws: a REST flood
    # (the daemon runs under a 256-descriptor limit) with an Allocate inside it, SIGHUP,
    # an Allocate naming one device 300,000 times, then a settle that checks everything.
    script = parse_script(
        "rest-flood=600/1x:partition-7;daemon-hup;allocate-huge=2x:partition-3;"
        "rest-flood=300/2x:partition-5;settle"
    )
    result = run_campaign(tmp_path, "simulator", 1, 0, script=script)
    assert result.steps == 5
    assert result.faults["REST connection flood"] == 2
    assert result.faults["daemon SIGHUP"] == 1
    assert result.faults["huge duplicate Allocate"] == 1
    assert not result.violations, "\n".join(str(v) for v in result.violations)


@pytest.mark.parametrize("backend", ["simulator", "fmpm"])
def test_garbled_lists_and_an_impossible_overlap_leave_no_violation(
    tmp_path: Path, backend: str
) -> None:
    # FM's list answers cut short for a while (an Allocate in the middle), then FM's
    # state with two overlapping partitions active (6 = modules 6 and 8, 14 = module 8),
    # which no pod holds: the node must keep serving and converge out of both.
    # Then both again across daemon restarts: one started while FM's lists are garbled
    # waits for FM and serves once they clear; one started while FM has the overlap
    # refuses to start (exit 1, one line naming both), and serves once the operator
    # deactivates the partition no pod holds.
    # A second refusal in the same run is checked in its own daemon's lines (every daemon
    # of a campaign appends to one log).
    script = parse_script(
        "fm=garbled;allocate=1x:partition-7;fm=ungarbled;fm-overlap=6,14;settle;"
        "fm=garbled;daemon-kill;settle;fm-overlap=6,14;daemon-term;settle;"
        "fm-overlap=5,13;daemon-kill;settle"
    )
    result = run_campaign(tmp_path, backend, 1, 0, script=script)
    assert result.steps == 14
    assert result.faults["FM garbled"] == 2
    assert result.faults["FM reports overlapping partitions active"] == 3
    assert result.convergence_s, "the settle measured no convergence"
    assert not result.violations, "\n".join(str(v) for v in result.violations)
