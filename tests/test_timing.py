"""compress.deploy.timing.time_interleaved: warm-up, interleaving with the order flipping every
round, a runner's own clock where it has one, and sample counts. A fake clock makes every number
exact (nothing sleeps)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from compress.deploy import timing


@pytest.fixture
def clock(monkeypatch):
    """The timer's clock, advanced only by the fake runners."""
    c = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: c.t))
    return c


def _runner(name: str, log: list, clock, seconds: float = 0.0):
    def run():
        log.append(name)
        clock.t += seconds
    return run


class OwnClock:
    """A runner that times itself (like a TensorRT engine with CUDA events)."""

    def __init__(self, name: str, log: list, ms: float):
        self.name, self.log, self.ms = name, log, ms

    def __call__(self):
        raise AssertionError("a runner with time_calls must be timed through time_calls")

    def time_calls(self, n: int) -> list[float]:
        self.log += [self.name] * n
        return [self.ms] * n


def test_order_flips_every_round(clock):
    log: list[str] = []
    res = timing.time_interleaved({"A": _runner("A", log, clock), "B": _runner("B", log, clock)},
                                  warmup=0, iters=6, rounds=3)
    assert log == ["A", "A", "B", "B", "B", "B", "A", "A", "A", "A", "B", "B"]
    assert res["A"]["n"] == res["B"]["n"] == 6


def test_three_runners_reverse_and_warmup_comes_first_in_name_order(clock):
    log: list[str] = []
    names = ["dense", "compressed", "int8"]
    timing.time_interleaved({n: _runner(n, log, clock) for n in names}, warmup=2, iters=4, rounds=2)
    warm, rounds = log[:6], log[6:]
    assert warm == ["dense", "dense", "compressed", "compressed", "int8", "int8"]
    assert rounds == ["dense"] * 2 + ["compressed"] * 2 + ["int8"] * 2 + ["int8"] * 2 + ["compressed"] * 2 + ["dense"] * 2


def test_samples_are_per_call_milliseconds(clock):
    log: list[str] = []
    res = timing.time_interleaved({"fast": _runner("fast", log, clock, 0.001), "slow": _runner("slow", log, clock, 0.003)},
                                  warmup=1, iters=10, rounds=5)
    assert res["fast"]["n"] == res["slow"]["n"] == 10  # warm-up calls are not samples
    for k in ("p50", "p90", "p99", "mean"):
        assert res["fast"][k] == pytest.approx(1.0) and res["slow"][k] == pytest.approx(3.0)


def test_a_runners_own_time_calls_is_used(clock):
    log: list[str] = []
    own = OwnClock("trt", log, ms=0.25)
    res = timing.time_interleaved({"trt": own, "ort": _runner("ort", log, clock, 0.002)}, warmup=3, iters=4, rounds=2)
    assert log == ["trt"] * 3 + ["ort"] * 3 + ["trt", "trt", "ort", "ort", "ort", "ort", "trt", "trt"]
    assert res["trt"] == {"p50": 0.25, "p90": 0.25, "p99": 0.25, "mean": 0.25, "n": 4}
    assert res["ort"]["p50"] == pytest.approx(2.0)
    assert timing.timed_calls(own, 5) == [0.25] * 5


def test_sample_counts(clock):
    log: list[str] = []
    # fewer iterations than rounds: one call per runner per round
    res = timing.time_interleaved({"A": _runner("A", log, clock)}, warmup=0, iters=2, rounds=5)
    assert res["A"]["n"] == 5
    # iters not a multiple of rounds: iters // rounds calls per round
    res = timing.time_interleaved({"A": _runner("A", log, clock)}, warmup=0, iters=11, rounds=3)
    assert res["A"]["n"] == 9


def test_min_time_adds_whole_rounds(clock):
    log: list[str] = []
    runners = {"A": _runner("A", log, clock, 0.001), "B": _runner("B", log, clock, 0.003)}
    # a round is 2 calls each = 8 ms; 50 ms needs 7 rounds (56 ms), not the 2 asked for
    res = timing.time_interleaved(runners, warmup=5, iters=4, rounds=2, min_time_s=0.05)
    assert res["A"]["n"] == res["B"]["n"] == 14
    rounds = log[10:]
    assert [rounds[i * 4] for i in range(7)] == ["A", "B", "A", "B", "A", "B", "A"]  # still flipping


def test_percentiles():
    p = timing.percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert p["p50"] == 3.0 and p["mean"] == 22.0 and p["n"] == 5
    assert 4.0 < p["p90"] < p["p99"] < 100.0
