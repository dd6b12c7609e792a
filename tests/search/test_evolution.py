"""The `evolution` search (edgeprune/evolution.py, MetaPruning's evolution over width vectors): determinism for a
seed, the hard constraint, improvement over the initial population; builds of the bundled example with it."""

from __future__ import annotations

import itertools

import pytest

from edgeprune.search.allocate import allowed_widths
from edgeprune.search.evolution import EvolutionSettings, evolve
from tests.search.test_itpruner import build_and_replay, method_env  # noqa: F401 - the module fixture

WIDTHS = {"g0": 32, "g1": 64, "g2": 48, "g3": 64, "g4": 32}
OPTIONS = {n: allowed_widths(c, 8, 8) for n, c in WIDTHS.items()}
SMALL = EvolutionSettings(population=12, generations=6, topk=4, max_tries=30)


def error(w: dict[str, int]) -> float:
    """A toy proxy: groups differ in how much they suffer from pruning (squared, weighted), with an interaction
    between neighbours, so the optimum under the constraint is not any single group's."""
    frac = {n: 1 - w[n] / WIDTHS[n] for n in WIDTHS}
    sharp = {"g0": 3.0, "g1": 0.5, "g2": 2.0, "g3": 0.7, "g4": 4.0}
    return sum(sharp[n] * frac[n] ** 2 for n in WIDTHS) + sum(frac[a] * frac[b] for a, b in itertools.pairwise(WIDTHS))


def latency(w: dict[str, int]) -> float:
    c = [3] + [w[n] for n in WIDTHS]
    return sum(a * b for a, b in itertools.pairwise(c)) / 1000


FULL = latency(WIDTHS)


def test_evolution_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    a = evolve(OPTIONS, error, latency, 0.4 * FULL, SMALL, seed=3)
    b = evolve(OPTIONS, error, latency, 0.4 * FULL, SMALL, seed=3)
    c = evolve(OPTIONS, error, latency, 0.4 * FULL, SMALL, seed=4)
    assert [i.widths for i in a.evaluated] == [i.widths for i in b.evaluated]
    assert [i.widths for i in a.top] == [i.widths for i in b.top]
    assert [i.widths for i in a.evaluated] != [i.widths for i in c.evaluated]


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_every_candidate_meets_the_constraint_and_has_allowed_widths(ratio: float) -> None:
    evo = evolve(OPTIONS, error, latency, ratio * FULL, SMALL, seed=0)
    assert len(evo.evaluated) > SMALL.population  # children were bred, not only the initial population
    for ind in evo.evaluated:
        assert latency(ind.widths) <= ratio * FULL + 1e-12
        assert all(ind.widths[n] in OPTIONS[n] for n in WIDTHS)
    assert [i.error for i in evo.top] == sorted(i.error for i in evo.top)


def test_evolution_improves_the_proxy_over_its_initial_population() -> None:
    for seed in range(3):
        evo = evolve(OPTIONS, error, latency, 0.4 * FULL, SMALL, seed=seed)
        first = min(i.error for i in evo.initial)
        assert evo.top[0].error < first
        assert evo.top[0].generation > 0
    # and it approaches the optimum of the exhaustive search (4 x 8 x 6 x 8 x 4 vectors)
    best = min((dict(zip(WIDTHS, combo)) for combo in itertools.product(*OPTIONS.values())
                if latency(dict(zip(WIDTHS, combo))) <= 0.4 * FULL), key=error)
    big = evolve(OPTIONS, error, latency, 0.4 * FULL, EvolutionSettings(population=24, generations=12), seed=0)
    assert big.top[0].error <= error(best) * 1.05


def test_an_unreachable_bound_gives_no_candidate() -> None:
    evo = evolve(OPTIONS, error, latency, 0.0, SMALL, seed=0)
    assert evo.top == () and all(latency(i.widths) > 0 for i in evo.evaluated)


@pytest.fixture
def small_evolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeprune.search.evolution as ev

    monkeypatch.setattr(ev, "DEFAULT_SETTINGS", EvolutionSettings(population=6, generations=2, topk=3, finalists=2))


@pytest.mark.parametrize("flags", [("--criterion", "cap"), ("--no-compensation",)], ids=["compensated", "sliced"])
def test_evolution_build_meets_budget_and_prune_plan_replays_it(method_env: dict,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                small_evolution: None, flags: tuple[str, ...]) -> None:
    r = build_and_replay(method_env, monkeypatch, f"evolution-{len(flags)}", "--search", "evolution",
                         "--tolerance", "0.2", *flags)
    s = r["search"]
    assert s["outer"] == "evolution" and s["compensation"] == ("--no-compensation" not in flags)
    assert 1 <= s["measured_candidates"] <= 12
    assert all(c["error"] is not None for c in s["trace"])


def test_evolution_build_on_a_latency_table(method_env: dict, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                            small_evolution: None) -> None:
    r = build_and_replay(method_env, monkeypatch, "evolution-lut", "--search", "evolution", "--tolerance", "0.2",
                         "--lut", str(method_env["table"]))
    assert r["search"]["outer"] == "evolution" and {c["source"] for c in r["search"]["trace"]} == {"lut"}


def test_an_unknown_search_is_refused_before_any_work() -> None:
    from edgeprune.config import BuildConfig, PruneConfig
    from edgeprune.errors import EdgePruneError

    with pytest.raises(EdgePruneError, match="--search must be strength or evolution, found 'annealing'"):
        BuildConfig(prune=PruneConfig(), search="annealing")
