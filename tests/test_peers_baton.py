"""The baton of ``benchmarks/peers.py`` (``peers_metering.RoundRobin``): turns go round in order, a thread that
leaves is skipped, and passing the baton wakes the next thread only."""

from __future__ import annotations

import threading
from pathlib import Path

from scripts import load_script

METERING = Path(__file__).resolve().parent.parent / "benchmarks" / "peers_metering.py"


def turns_taken(baton, rounds: dict[str, int]) -> list[str]:
    """The names in the order their threads held the baton, each thread taking ``rounds[name]`` turns, then leaving."""
    turns: list[str] = []

    def participant(name: str) -> None:
        baton.wait_turn(name)
        for turn in range(rounds[name]):
            turns.append(name)
            if turn < rounds[name] - 1:
                baton.pass_turn(name)
                baton.wait_turn(name)
        baton.leave(name)

    threads = [threading.Thread(target=participant, args=(name,)) for name in rounds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads), "a thread never got the baton back"
    return turns


def test_turns_go_round_in_order_and_skip_a_thread_that_left(monkeypatch):
    metering = load_script(METERING, monkeypatch)
    baton = metering.RoundRobin(["a", "b", "c"])
    turns = turns_taken(baton, {"a": 3, "b": 1, "c": 3})  # b leaves after its first turn
    assert turns == ["a", "b", "c", "a", "c", "a", "c"]


def test_passing_the_baton_wakes_only_the_next_thread(monkeypatch):
    metering = load_script(METERING, monkeypatch)
    baton = metering.RoundRobin(["a", "b", "c"])
    baton.pass_turn("a")
    # Only b's event is set: a's and c's waits keep sleeping (the old shared condition woke both to re-check).
    holds = {name: event.is_set() for name, event in baton._turn_of.items()}
    assert holds == {"a": False, "b": True, "c": False}


def test_a_shuffled_baton_gives_every_thread_one_turn_a_lap_in_new_orders(monkeypatch):
    metering = load_script(METERING, monkeypatch)
    names = ["a", "b", "c", "d"]
    baton = metering.RoundRobin(names, shuffle_seed=0)
    turns = turns_taken(baton, dict.fromkeys(names, 6))
    lap_orders = [turns[i : i + 4] for i in range(0, len(turns), 4)]
    assert lap_orders[0] == names  # the first lap in the table's order
    assert all(sorted(lap) == names for lap in lap_orders)  # every thread once a lap
    assert len({tuple(lap) for lap in lap_orders}) > 2  # the orders change from lap to lap
    assert all(a != b for a, b in zip(turns, turns[1:]))  # never two turns in a row
