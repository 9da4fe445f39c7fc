"""benchmarks/optim_claims.py: the math of tokens-to-match and of QK-Clip's cost against values
worked out by hand, then one tiny run of each command (2- and 4-step budgets of a tiny model) that
checks what its JSON holds. The full measurements are run by hand (README)."""
import json
import math
import os

import pytest

import bench
from benchmarks import optim_claims as oc
from conftest import TINY_FLAGS

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

STEPS = [50, 100, 200, 400]
LOSSES = [5.0, 4.6, 4.2, 4.0]


def test_tokens_to_match_reads_the_curve_in_log_tokens():
    # 4.3 is 3/4 of the way from 4.6 (100) to 4.2 (200): 100 * 2**0.75 = 168.179 (not 175: log scale)
    rel, t = oc.tokens_to_match(STEPS, LOSSES, 4.3)
    assert rel == "=" and t == pytest.approx(168.179, abs=1e-3)
    assert oc.tokens_to_match([100, 400], [5.0, 4.0], 4.5) == ("=", pytest.approx(200.0))  # geometric mean
    assert oc.tokens_to_match(STEPS, LOSSES, 4.2) == ("=", pytest.approx(200.0))           # on a budget
    assert oc.tokens_to_match(STEPS, LOSSES, 5.0) == ("=", 50)


def test_tokens_to_match_gives_bounds_outside_the_measured_budgets():
    assert oc.tokens_to_match(STEPS, LOSSES, 5.5) == ("<", 50)   # ahead even at the smallest budget
    assert oc.tokens_to_match(STEPS, LOSSES, 3.9) == (">", 400)  # behind even at the largest


def test_tokens_to_match_takes_the_first_crossing():
    # 4.6 is 4/5 of the way from 5.0 (50) to 4.5 (100): 50 * 2**0.8 = 87.055; the bump after is ignored
    rel, t = oc.tokens_to_match(STEPS, [5.0, 4.5, 4.7, 4.0], 4.6)
    assert rel == "=" and t == pytest.approx(87.055, abs=1e-3)


@pytest.mark.parametrize("tokens, losses", [([], []), ([100, 50], [5.0, 4.0]), ([50, 100], [5.0])])
def test_tokens_to_match_refuses_a_malformed_curve(tokens, losses):
    with pytest.raises(ValueError, match="tokens must be increasing"):
        oc.tokens_to_match(tokens, losses, 4.5)


def test_match_rows():
    # 10 tokens a step; AdamW 0.2 s a step, MuonClip 0.3 s
    adamw = {100: 5.5, 200: 4.6, 400: 4.3}
    rows = {r["adamw_steps"]: r for r in oc.match_rows(adamw, dict(zip(STEPS, LOSSES)), 10, 0.2, 0.3)}
    # AdamW 200 steps reach 4.6, which MuonClip reaches at exactly 100 steps: 0.5 of the tokens,
    # 100 x 0.3 = 30 s against 200 x 0.2 = 40 s: 0.75 of the step seconds
    r = rows[200]
    assert (r["relation"], r["muon_tokens"], r["adamw_tokens"]) == ("=", pytest.approx(1000), 2000)
    assert r["ratio_tokens"] == pytest.approx(0.5) and r["ratio_step_s"] == pytest.approx(0.75)
    assert (r["adamw_step_s"], r["muon_step_s"]) == (pytest.approx(40), pytest.approx(30))
    r = rows[400]  # 168.179 steps of 400: 0.420448; x 1.5 = 0.630672
    assert r["ratio_tokens"] == pytest.approx(0.420448, abs=1e-6)
    assert r["ratio_step_s"] == pytest.approx(0.630672, abs=1e-6)
    r = rows[100]  # AdamW's 5.5 is above MuonClip's loss at 50 steps: a bound, < 0.5
    assert (r["relation"], r["muon_steps"], r["ratio_tokens"]) == ("<", 50, 0.5)


def test_best_per_budget_flags_an_lr_at_the_edge_of_its_grid():
    def run(opt, steps, lr, loss):
        return {"optimizer": opt, "steps": steps, "lr": lr, "val_loss": loss}
    runs = [run("adamw", 100, 1e-3, 5.0), run("adamw", 100, 2e-3, 4.0), run("adamw", 100, 4e-3, 4.5),
            run("adamw", 200, 4e-3, 4.0), run("adamw", 200, 1e-3, 5.0), run("adamw", 200, 2e-3, 4.5),
            run("muonclip", 100, 2e-3, 4.2), run("muonclip", 100, 1e-3, 4.1),
            run("muonclip", 200, 3e-3, 3.9)]
    best = oc.best_per_budget(runs)
    assert {k: (b["lr"], b["edge"]) for k, b in best.items()} == {
        ("adamw", 100): (2e-3, ""), ("adamw", 200): (4e-3, "high"), ("muonclip", 100): (1e-3, "low"),
        ("muonclip", 200): (3e-3, "")}  # a grid of one lr has no edge to flag


def test_mean_std_and_clipped_share():
    m, sd = oc.mean_std([0.01, -0.01, 0.03])  # deviations 0, -0.02, 0.02: sqrt(0.0008 / 2) = 0.02
    assert m == pytest.approx(0.01) and sd == pytest.approx(0.02)
    assert oc.mean_std([0.5]) == (0.5, None)
    assert oc.clipped_share([0, 2, 1, 0]) == 0.5
    assert oc.step_seconds([[{"ms": 900}, {"ms": 200}, {"ms": 400}], [{"ms": 50}, {"ms": 300}]]) == 0.3


# ----------------------------------------------------------------------------- one tiny run of each

def _model_flags(corpus_dir, cache_dir):
    """TINY_FLAGS less the two this benchmark sets itself, with the test corpus."""
    flags = [f for i, f in enumerate(TINY_FLAGS) if f not in ("--seq-len", "--batch-size")
             and TINY_FLAGS[i - 1] not in ("--seq-len", "--batch-size")]
    return " ".join(flags + ["--data", corpus_dir, "--cache-dir", cache_dir])


def _finite(*xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def test_optim_match_runs(corpus_dir, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # out/bench/ lands here
    bench.main(["optim-match", "--batch-size", "4", "--seq-len", "32", "--adamw-steps", "2", "4",
                "--muon-steps", "2", "4", "--adamw-lrs", "1e-3", "3e-3", "--muon-lrs", "3e-3",
                "--train-flags", _model_flags(corpus_dir, cache_dir)])
    out = capsys.readouterr().out
    j = json.load(open("out/bench/optim_match.json"))
    assert len(j["runs"]) == 2 * 2 + 2 * 1 and len(j["tuned"]) == 4
    for r in j["runs"]:
        assert len(r["loss"]) == len(r["ms"]) == r["steps"] and r["tokens"] == r["steps"] * 4 * 32
        assert len(r["max_logit_curve"]) == (r["steps"] if r["optimizer"] == "muonclip" else 0)
        assert _finite(r["val_loss"], r["val_bpb"], r["step_ms"], *r["loss"])
    assert [r["adamw_steps"] for r in j["match"]] == [2, 4]
    for r in j["match"]:
        assert r["relation"] in "<=>" and _finite(r["ratio_tokens"], r["ratio_step_s"], r["muon_tokens"])
    assert "tokens_ratio" in out and "optim-match took" in out
    assert os.path.exists("out/bench/optim_match_loss.png") or "no plot written" in out


def test_optim_clip_runs(corpus_dir, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bench.main(["optim-clip", "--batch-size", "4", "--seq-len", "32", "--steps", "3", "--seeds", "0", "1",
                "--lr", "1e-2", "--tau", "0.05", "--train-flags", _model_flags(corpus_dir, cache_dir)])
    out = capsys.readouterr().out
    j = json.load(open("out/bench/optim_clip_tau0.05.json"))
    assert [(r["seed"], r["clip"]) for r in j["runs"]] == [(0, False), (0, True), (1, False), (1, True)]
    for r in j["runs"]:
        assert len(r["max_logit"]) == len(r["heads_clipped"]) == 3 and _finite(r["val_loss"], *r["max_logit"])
        assert r["clip"] or sum(r["heads_clipped"]) == 0  # --no-qk-clip only reports
    assert [r["seed"] for r in j["rows"]] == [0, 1]
    for r in j["rows"]:
        assert r["diff"] == pytest.approx(r["val_clip"] - r["val_no_clip"]) and 0 <= r["clipped_steps"] <= 1
    assert set(j["mean_std"]) == {"val_no_clip", "val_clip", "diff", "clipped_steps"}
    assert _finite(*j["mean_std"]["diff"])
    assert os.path.exists("out/bench/optim_clip_tau0.05_max_logit.png") or "no plot written" in out
