"""train.py --time-budget (the plan of steps, the stop on time, the schedule's end) and the search
that uses it, `bench.py quickstart`, end to end on a tiny model with budgets of seconds. Their bad
flags (one clear line each) are in tests/test_bad_input.py."""
import json
import os
import shlex

import pytest

import bench
import train
from conftest import TINY_FLAGS, metrics, train_flags

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_planned_steps():
    # 10 steps in 5 s of a 10 s budget: 10 more fit
    assert train.planned_steps(9, 5.0, 10.0, cap=10**6) == 20
    assert train.planned_steps(9, 5.0, 10.0, cap=15) == 15       # --max-steps caps the plan
    assert train.planned_steps(9, 9.6, 10.0, cap=10**6) == 10    # no step fits after this: the last
    assert train.planned_steps(9, 12.0, 10.0, cap=10**6) == 10   # overrun (a slow step): the last too
    assert train.planned_steps(0, 0.5, 10.0, cap=10**6) == 20    # step 0: its forward and backward timed


def test_time_budget_stops_on_time_and_ends_the_schedule(corpus_dir, cache_dir, tmp_path):
    budget, lr = 3.0, 1e-2
    final = train.main(train_flags(corpus_dir, cache_dir, tmp_path, "--time-budget", str(budget), "--lr", str(lr),
                                   "--max-steps", "1000000", "--eval-every", "1000000", "--log-every", "100"))
    m = metrics(tmp_path)
    n = final["steps"]
    assert sorted(m) == list(range(1, n + 1)) and "val_bpb" in m[n]  # the final eval at the last step
    slowest = max(r["ms"] for r in m.values()) / 1000
    assert budget - 2 * slowest - 0.5 <= m[n]["elapsed_s"] <= budget + slowest + 0.5, (m[n]["elapsed_s"], slowest)
    assert n >= 20, n  # (a step of the tiny model takes milliseconds)
    # the schedule of a --max-steps n run: warmup, the peak, then the cosine down to 10% at the end
    assert m[n // 2]["lr"] == pytest.approx(lr)
    assert m[n]["lr"] == pytest.approx(lr * train.lr_multiplier(n - 1, n, max(1, n // 20), 0.3, 0.1))
    assert m[n]["lr"] < 0.11 * lr
    decay = [m[s]["lr"] for s in range(int(0.75 * n), n + 1)]
    assert decay == sorted(decay, reverse=True)


def test_quickstart_search_end_to_end(corpus_dir, cache_dir, tmp_path, monkeypatch, capsys):
    """Two candidates on the tiny model for 2 s each, the better one again with a second seed."""
    monkeypatch.chdir(tmp_path)  # out/bench/ lands here
    base = shlex.join(["--data", corpus_dir, "--cache-dir", cache_dir, *TINY_FLAGS])
    bench.main(["quickstart", "--candidates", "baseline,lr-5e-3", "--budget", "2", "--top", "1", "--seeds", "2",
                "--threads", "1", "--train-flags", base])
    out = capsys.readouterr().out
    assert [line[:6] for line in out.splitlines() if line.startswith("[")] == ["[1/3] ", "[2/3] ", "[3/3] "]
    result = json.load(open(tmp_path / "out" / "bench" / "quickstart.json"))
    rows = {r["candidate"]: r for r in result["rows"]}
    assert set(rows) == {"baseline", "lr-5e-3"} and rows["lr-5e-3"]["flags"] == "--lr 5e-3"
    for r in rows.values():
        assert "error" not in r, r
        assert r["steps"] >= 1 and r["tokens"] == r["steps"] * 8 * 32 and r["val_bpb"] > 0 and r["wall_s"] > 2
        assert sorted(os.listdir(r["dir"])) == ["config.json", "metrics.jsonl", "train.log"]  # no checkpoint
    best = min(rows.values(), key=lambda r: r["val_bpb"])["candidate"]
    assert [(r["candidate"], r["seed"]) for r in result["reruns"]] == [(best, 1338)]
    assert result["noise"][0]["candidate"] == best and result["noise"][0]["seeds"] == 2
    assert "seed noise" in out and f"best: {best}" in out
