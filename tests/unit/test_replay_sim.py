"""Replay on traces whose answers are computed by hand, and invariants on random traces."""

from __future__ import annotations

import random

import pytest

from exporter_watchdog.core.model import Policy, StartRule
from exporter_watchdog.replay.place import Placed, place
from exporter_watchdog.replay.run import Case, World, replay
from exporter_watchdog.replay.simulate import NodeResult, ServerModel, simulate_node
from exporter_watchdog.replay.synth import SynthSpec, generate
from exporter_watchdog.replay.trace import TraceJob, parse_sacct

ALL4 = frozenset({0, 1, 2, 3})
POLICY = Policy(claim_gpus=2, cooldown_seconds=60)
COLD = ServerModel(cold_start=100.0)


def run(jobs: list[Placed], policy: Policy = POLICY, model: ServerModel = COLD, gpus: int = 4,
        t1: float = 1000.0) -> NodeResult:
    return simulate_node("n1", gpus, jobs, policy, model, 0.0, t1, record=True)


def test_free_node_after_one_job_serves_to_the_end() -> None:
    r = run([(0.0, 100.0, "a", ALL4)])
    # Free at 100, ready at 200 (cold start 100), serving 2 GPUs until 1000.
    assert r.harvest_log == [((2, 3), 200.0, 1000.0)]
    assert r.harvested == 2 * 800
    assert r.idle == 4 * 900
    assert r.clairvoyant == 2 * (900 - 100)
    assert (r.starts, r.yields, r.wasted) == (1, 0, 0)


def test_jobs_on_other_gpus_do_not_disturb_and_a_job_on_ours_ends_the_harvest() -> None:
    r = run([(0.0, 100.0, "a", ALL4), (500.0, 600.0, "b", frozenset({0, 1})), (650.0, 700.0, "c", ALL4)])
    # b uses GPUs 0-1 only; c takes ours at 650; after c, the 60 s cool-down, then a new cold start.
    assert r.harvest_log == [((2, 3), 200.0, 650.0), ((2, 3), 860.0, 1000.0)]
    assert r.harvested == 2 * 450 + 2 * 140
    assert r.idle == 4 * 400 + 2 * 100 + 4 * 50 + 4 * 300
    assert r.clairvoyant == 2 * (550 - 100) + 2 * (300 - 100)
    assert (r.starts, r.yields, r.wasted, r.conflicts) == (2, 1, 0, 1)


@pytest.mark.parametrize(("next_job", "starts_after_yield"), [(759.0, 0), (760.0, 0), (761.0, 1)])
def test_cooldown_boundary(next_job: float, starts_after_yield: int) -> None:
    """After a yield (c ends at 700) the GPUs must stay free a full cool-down of 60 s: a job at 759 or
    at 760 (seen in the same decision as the cool-down's end) leaves no start; at 761 one start happens."""
    jobs: list[Placed] = [(0.0, 100.0, "a", ALL4), (650.0, 700.0, "c", ALL4), (next_job, 2000.0, "d", ALL4)]
    r = run(jobs, t1=2000.0)
    assert r.starts == 1 + starts_after_yield
    assert r.wasted == starts_after_yield  # a start at 760 is yielded at 761, before ready


def test_cooldown_exactly_met_starts_then() -> None:
    r = run([(0.0, 100.0, "a", ALL4), (650.0, 700.0, "c", ALL4)], t1=2000.0)
    assert r.harvest_log[1] == ((2, 3), 760.0 + 100.0, 2000.0)


def test_job_during_the_cold_start_is_one_wasted_start() -> None:
    r = run([(0.0, 100.0, "a", ALL4), (150.0, 400.0, "b", ALL4)])
    # Started at 100, b came at 150 before ready (200): one wasted start, 2 GPUs x 50 s spent loading.
    assert (r.starts, r.yields, r.wasted) == (2, 1, 1)
    assert r.wasted_gpu_seconds == 2 * 50
    assert r.harvest_log == [((2, 3), 560.0, 1000.0)]  # b ends 400, cool-down to 460, ready 560


def test_stop_time_delays_the_next_start() -> None:
    r = run([(0.0, 100.0, "a", ALL4), (300.0, 320.0, "b", ALL4)], model=ServerModel(100.0, stop=50.0))
    # Yield at 300; the server is gone at 350, and the cool-down counts from then: start 410, ready 510.
    assert r.harvest_log == [((2, 3), 200.0, 300.0), ((2, 3), 510.0, 1000.0)]


def test_detection_delay_ends_the_harvest_at_the_job_start_not_at_its_sighting() -> None:
    r = run([(0.0, 100.0, "a", ALL4), (600.0, 700.0, "b", ALL4)], model=ServerModel(100.0, detect_delay=5.0))
    # a is seen only at 5: the start at 0 is wasted. a is seen gone at 105; cool-down to 165, ready at
    # 265; b starts at 600 (seen at 605): the harvest ends at 600.
    assert r.wasted == 1
    assert r.harvest_log[0] == ((2, 3), 265.0, 600.0)


def test_multi_node_job_yields_on_each_node() -> None:
    trace = parse_sacct([
        "JobID|NodeList|AllocTRES|Start|End|State",
        "1|n[1-2]|billing=4,cpu=2,gres/gpu=4,node=2|1970-01-01T00:03:20|1970-01-01T00:05:00|COMPLETED",
        "2|n1|gres/gpu=1,node=1|1970-01-01T00:00:00|1970-01-01T00:00:01|COMPLETED",
    ])
    placement = place(trace.jobs, {"n1": 2, "n2": 2}, unknown_end=1000.0)
    assert placement.jobs("n2") == [(200.0, 300.0, "1", frozenset({0, 1}))]
    world = World(placement, {"n1": 2, "n2": 2}, 0.0, 1000.0)
    case = Case(Policy(claim_gpus=2, cooldown_seconds=0), ServerModel(50.0))
    n1, n2 = replay(world, [case])[0]
    # n1: job 2 until 1, start 1 ready 51, yield 200, start 300 ready 350. n2: ready 50, yield 200, ready 350.
    assert (n1.yields, n2.yields) == (1, 1)
    assert n1.harvested == 2 * (200 - 51) + 2 * (1000 - 350)
    assert n2.harvested == 2 * (200 - 50) + 2 * (1000 - 350)


def test_unknown_end_holds_the_gpus_to_the_end_of_the_window() -> None:
    jobs = [TraceJob("1", ("n1",), (2,), 0.0, 100.0), TraceJob("2", ("n1",), (2,), 500.0, None)]
    placement = place(jobs, {"n1": 2}, unknown_end=1000.0)
    assert placement.jobs("n1")[1] == (500.0, 1000.0, "2", frozenset({0, 1}))
    r = run(placement.jobs("n1"), Policy(claim_gpus=2, cooldown_seconds=0), gpus=2)
    assert r.harvest_log == [((0, 1), 200.0, 500.0)]
    assert r.idle == 2 * 400


def test_placement_takes_the_lowest_free_indices() -> None:
    jobs = [TraceJob("a", ("n",), (2,), 0.0, 100.0), TraceJob("b", ("n",), (1,), 10.0, 50.0),
            TraceJob("c", ("n",), (2,), 50.0, 60.0), TraceJob("d", ("n",), (1,), 100.0, 200.0)]
    placed = place(jobs, {"n": 4}, unknown_end=1000.0).jobs("n")
    assert [p[3] for p in placed] == [{0, 1}, {2}, {2, 3}, {0}]


def test_learned_rule_skips_a_start_the_recent_gaps_call_short() -> None:
    """Five 30 s gaps teach the node that gaps are shorter than the 100 s cold start."""
    jobs: list[Placed] = []
    t = 0.0
    for k in range(10):
        jobs.append((t, t + 100.0, f"j{k}", ALL4))
        t += 130.0  # 30 s gaps
    end = t - 30 + 500  # then a 500 s gap
    always = run(jobs, Policy(claim_gpus=2, cooldown_seconds=0), t1=end)
    learned = run(jobs, Policy(claim_gpus=2, cooldown_seconds=0, start_rule=StartRule.LEARNED,
                               cold_start_seconds=100.0), t1=end)
    assert always.wasted == 9
    # Five gaps to learn from (the sixth to ninth short gaps are skipped), then a 30 s wait in the last one.
    assert learned.wasted == 5
    assert always.harvested == 2 * (500 - 100)
    assert learned.harvested == 2 * (500 - 30 - 100)


def _check_invariants(world: World, results: list[NodeResult]) -> None:
    for r in results:
        assert r.harvested <= r.clairvoyant + 1e-6, r
        assert r.clairvoyant <= r.idle + 1e-6, r
        assert r.wasted <= r.yields <= r.starts
        for gpus, a, b in r.harvest_log or []:
            for start, end, job_id, held in world.placement.jobs(r.node):
                if start < b and end > a:
                    assert not (held & set(gpus)), f"{r.node}: harvest {a}-{b} on {gpus} while {job_id} held {held}"


@pytest.mark.parametrize("seed", range(6))
def test_random_traces_keep_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    spec = SynthSpec(nodes=4, gpus_per_node=rng.choice((2, 4, 8)), days=2, load=rng.choice((0.3, 0.6, 0.9)),
                     seed=seed)
    jobs = generate(spec)
    node_gpus = {n: spec.gpus_per_node for n in spec.node_names()}
    t0, t1 = spec.start, spec.start + spec.days * 86400
    world = World(place(jobs, node_gpus, unknown_end=t1), node_gpus, t0, t1)
    for _ in range(3):
        policy = Policy(claim_gpus=rng.randint(1, spec.gpus_per_node), cooldown_seconds=rng.choice((0, 60, 600)),
                        start_rule=rng.choice(list(StartRule)), cold_start_seconds=rng.choice((30.0, 300.0)),
                        yield_on_any_job=rng.random() < 0.2)
        model = ServerModel(cold_start=rng.choice((0.0, 30.0, 300.0, 1200.0)), stop=rng.choice((0.0, 10.0)),
                            detect_delay=rng.choice((0.0, 0.05, 3.0)))
        results = [world.replay_node(Case(policy, model), n, record=True) for n in sorted(node_gpus)]
        assert sum(r.starts for r in results) > 0
        _check_invariants(world, results)


def test_worker_processes_give_the_same_answer() -> None:
    spec = SynthSpec(nodes=8, days=1, seed=3)
    node_gpus = {n: 8 for n in spec.node_names()}
    t1 = spec.start + 86400
    world = World(place(generate(spec), node_gpus, unknown_end=t1), node_gpus, spec.start, t1)
    cases = [Case(Policy(claim_gpus=c, cooldown_seconds=60), ServerModel(120.0)) for c in (1, 4)]
    assert replay(world, cases, workers=2) == replay(world, cases, workers=1)
