"""bench.py kv (benchmarks/kv.py, benchmarks/kv_speed.py): budgets fitted to equal bytes from measured
cache sizes, the validity verdict per byte target, a small real run's tables (which must name the full
latent cache as their reference), the throughput part's batches in one memory budget, and the
prefill's peak memory. Tiny shapes throughout; everything writes under tmp_path."""
import argparse
import json

import pytest
import torch

import bench
import keepkv
import keepkv_latent
from benchmarks import kv, kv_speed
from benchmarks.common import row_config
from model import build_model, get_args

SMALL = dict(dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_heads=2, n_routed_experts=4,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=128,
             vocab_size=300)


@pytest.fixture(scope="module")
def small_model():
    return build_model(get_args("tiny", **SMALL), "cpu", seed=0).eval()


def test_row_config_parses_a_row_spec_field_by_field():
    """'policy[:field=value...]' -> KVConfig: each value converted to its field's type, booleans
    spelled several ways, overrides on top; a bad field or value is a ValueError that names it."""
    assert row_config("h2o") == keepkv.KVConfig(policy="h2o")
    got = row_config("keepkv:merge_at=none:alpha=0:votes=off:window=3", budget=0.2)
    assert got == keepkv.KVConfig(policy="keepkv", merge_at="none", alpha=0.0, votes=False, window=3, budget=0.2)
    assert isinstance(got.alpha, float) and isinstance(got.window, int)
    assert [row_config(f"keepkv:votes={v}").votes for v in ("on", "TRUE", "1", "off", "false", "0")] == [True] * 3 + [False] * 3
    for spec, message in [("keepkv:nope=1", "unknown KVConfig field 'nope'"),
                          ("keepkv:policy=h2o", "unknown KVConfig field 'policy'"),
                          ("keepkv:votes=maybe", "votes takes on/off, got 'maybe'"),
                          ("keepkv:window=wide", "window='wide' is not an integer"),
                          ("keepkv:alpha=big", "alpha='big' is not a number")]:
        with pytest.raises(ValueError, match=message):
            row_config(spec)


@pytest.mark.parametrize("cache", ["latent", "per-head"])
@pytest.mark.parametrize("policy", ["keepkv", "snapkv", "streaming"])
def test_fit_budget_is_the_largest_capacity_within_the_target(small_model, cache, policy):
    P, new = 100, 8
    measure = lambda cfg: kv_speed.cache_bytes(kv_speed.make_caches(small_model, cache, cfg, P, new))  # noqa: E731
    full_latent = kv.byte_sizes(small_model, P)["latent"]
    # measured bytes per slot agree with keepkv_latent.slot_bytes (fp32 weights: 4-byte entries)
    slot = keepkv_latent.slot_bytes(small_model.args, cache, 4, policy in keepkv.MERGING)["slot"] * \
        small_model.args.n_layers
    cfg = keepkv.KVConfig(policy=policy, budget=0.3)
    slots = keepkv.capacity(P, cfg, new) + (0 if policy in keepkv.GROWING else 1)
    assert measure(cfg) == slots * slot
    for frac in (0.2, 0.5, 0.9, 3.0):
        target = frac * full_latent
        got = kv.fit_budget(small_model, cache, keepkv.KVConfig(policy=policy), target, P, new)
        floor = keepkv.KVConfig(policy=policy, budget=12 / P)       # n_sink + window = 12 entries
        if got is None:
            assert measure(floor) > target
            continue
        Sk = keepkv.capacity(P, got)
        assert Sk >= 12 and measure(got) <= target
        if Sk < P:  # the next capacity would exceed the target
            assert measure(keepkv.KVConfig(policy=policy, budget=(Sk + 1) / P)) > target
        else:
            assert frac == 3.0
    # the per-head cache at 0.2 of the full latent cache cannot hold even the floor here
    if cache == "per-head":
        assert kv.fit_budget(small_model, cache, keepkv.KVConfig(policy=policy), 0.2 * full_latent, P, new) is None


def test_validity_per_byte_target():
    def row(frac, dnll, cache="latent", policy="streaming", se=0.01):
        return {"cache": cache, "policy": policy, "frac": frac, "dnll": dnll, "dnll_se": se}
    rows = [row(0.1, 0.3), row(0.5, 0.05), row(0.1, -1.0, "per-head"), row(0.1, -1.0, policy="keepkv"),
            {"cache": "latent", "policy": "streaming", "frac": 0.05, "dnll": None}]   # unreachable target
    ok = kv.validity(rows, key="frac")
    assert ok["usable"] and ok["column"] == "frac" and "byte target" in ok["message"]
    assert "full latent cache" in ok["message"]
    bad = kv.validity(rows + [row(0.2, -0.01)], key="frac")   # beaten at 0.2 only; per-head rows do not count
    assert not bad["usable"] and bad["beaten_budgets"] == [0.2] and "byte target(s) 0.2" in bad["message"]
    noisy = kv.validity([row(0.1, 0.3), row(0.5, 0.015)], key="frac")
    assert not noisy["usable"] and noisy["within_noise_budgets"] == [0.5]
    assert not kv.validity([row(0.1, 0.3, "per-head")], key="frac")["usable"]   # latent streaming not measured


def test_small_real_run_tables_name_the_latent_cache(trained_checkpoint, corpus_dir, tmp_path, one_thread):
    out = tmp_path / "kv.json"
    bench.main(["kv", "--kv-ckpt", trained_checkpoint, "--kv-data", corpus_dir, "--kv-windows", "2",
                "--kv-batch", "2", "--kv-new", "4", "--kv-prompt", "56", "--kv-probe-dist", "8",
                "--kv-byte-fracs", "0.1,0.6", "--kv-budgets", "0.5", "--kv-policies", "keepkv,snapkv",
                "--kv-perhead-policies", "keepkv", "--kv-alphas", "0.8", "--kv-obs-windows", "",
                "--kv-thresholds", "", "--kv-skip", "throughput,memory", "--kv-out", str(out)])
    res = json.loads(out.read_text())
    q = res["quality"]
    assert q["reference"].startswith("full latent cache")
    assert q["full_per_head_bytes"] == 2 * q["full_latent_bytes"]   # conftest's model: H(Dn+Dr+Dv) = 2(C+Dr)
    assert set(q["break_even"]) == {"model", "kimi-k2"}
    assert q["break_even"]["kimi-k2"]["per-head"] == pytest.approx(0.0276, abs=1e-3)
    pairs = {(r["cache"], r["policy"]) for r in q["equal_bytes"]}
    assert pairs == {("latent", "keepkv"), ("latent", "snapkv"), ("latent", "streaming"), ("per-head", "keepkv"),
                     ("per-head", "streaming")}   # streaming added on both caches
    for r in q["equal_bytes"]:
        if r["budget"] is not None:
            assert r["bytes"] <= r["target_bytes"]
            assert r["bytes_vs_full_latent"] <= r["frac"]
            assert r["bytes_vs_full_per_head"] == pytest.approx(r["bytes"] / q["full_per_head_bytes"])
    reached = [r for r in q["equal_bytes"] if r["budget"] is not None]
    assert reached and any(r["budget"] is None for r in q["equal_bytes"])   # 0.1 is below every floor here
    assert q["validity"]["column"] == "frac" and isinstance(q["validity"]["usable"], bool)
    assert {(r["cache"], r["budget"]) for r in q["rows"]} == {("latent", 0.5), ("per-head", 0.5)}
    assert len(q["sweep"]) == 3 and all(r["cache"] == "latent" for r in q["sweep"])
    md = kv.markdown(res)
    captions = [line for line in md.split("\n") if line and not line.startswith("|")]
    assert len(captions) >= 5 and all("full latent cache" in c for c in captions), captions
    assert "| latent keepkv |" in md and "| per-head keepkv |" in md and "| - |" in md


def _speed_args(**kw):
    return argparse.Namespace(**{"kv_tp_prompt": 32, "kv_tp_batch": 2, "kv_tp_steps": 3, "kv_compile": False,
                                 "kv_tp_mem_mib": None, "kv_tp_mem_factor": 2.5, "kv_tp_max_batch": 12,
                                 "kv_mem_prompt": 64, "device": "cpu", **kw})


def test_throughput_batches_fit_the_memory_budget(one_thread):
    logged = []
    tp = kv_speed.throughput(_speed_args(), logged.append)
    per_seq, sm = tp["bytes_per_seq"], tp["same_memory"]
    mem = sm["budget_bytes"]
    assert mem == int(2.5 * 2 * per_seq["latent full"])
    assert sm["full_batch"] == mem // per_seq["latent full"] == 5
    assert sm["keepkv_batch"] == min(mem // per_seq["latent keepkv@0.1"], 12) > sm["full_batch"]
    runs = {(r["name"], r["batch"]): r for r in tp["runs"]}
    full, keep = runs["latent full", sm["full_batch"]], runs["latent keepkv@0.1", sm["keepkv_batch"]]
    assert full["bytes"] <= mem and keep["bytes"] <= mem and sm["within_budget"]   # measured at its batch
    assert full["bytes"] == 5 * per_seq["latent full"]
    assert sm["speedup"] == pytest.approx(keep["tokens_per_s"] / full["tokens_per_s"])
    assert sm["full_at_keepkv_batch"]["batch"] == sm["keepkv_batch"]   # tiny: fits this machine
    assert {r["name"] for r in tp["runs"] if r["batch"] == 2} == set(kv_speed.CONFIGS)
    assert runs["per-head full", 2]["bytes_vs_full_latent"] == pytest.approx(4.0)   # the tiny preset: 4x
    for r in tp["runs"]:
        assert r["bytes_vs_full_latent"] == pytest.approx(r["bytes"] / (per_seq["latent full"] * r["batch"]))
    md = "\n".join(kv_speed.markdown(tp, None, "cpu"))
    assert "vs full latent" in md and "batch 5" in md and f"batch {sm['keepkv_batch']}" in md


def test_fill_random_then_decode_every_cache(small_model):
    P, new, gen = 40, 2, torch.Generator().manual_seed(0)
    for cache in kv.CACHES:
        for policy in ("full", "keepkv", "snapkv"):
            caches = kv_speed.make_caches(small_model, cache, keepkv.KVConfig(policy=policy, budget=0.5), P, new, 2)
            kv_speed.fill_random(caches, P, gen)
            if policy != "full":
                assert int(caches[0].live()[0].sum()) // (1 if cache == "latent" else small_model.args.n_heads) \
                    == caches[0].kept
            logits = small_model(torch.zeros(2, 1, dtype=torch.long), torch.tensor([P]), caches)
            assert torch.isfinite(logits).all()


def test_prefill_memory_counts_the_cache(one_thread):
    mem = kv_speed.prefill_memory(_speed_args(), lambda s: None)
    assert [r["name"] for r in mem["rows"]] == ["latent full", "latent keepkv@0.1", "per-head keepkv@0.1"]
    for r in mem["rows"]:
        assert r["peak_bytes"] >= r["bytes"] > 0   # the cache is allocated inside the measurement
    assert mem["rows"][0]["bytes_vs_full_latent"] == 1.0
    assert "profiler" in mem["method"] and "Peak memory" in "\n".join(kv_speed.markdown(None, mem, "cpu"))
