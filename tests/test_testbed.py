"""benchmarks/testbed.py and the long-context parts of benchmarks/kv.py: loss by position, the
long-range probe's positions, the validity verdict, the testbed's cache (built once, then reused),
and a tiny end-to-end `bench.py kv`. Everything writes under tmp_path, never the repository's out/."""
import importlib.util
import json
import os
import random

import pytest
import torch

import bench
from benchmarks import kv, testbed
from conftest import TINY_FLAGS


def test_bucket_means_match_a_loop():
    nll = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    got = testbed.bucket_means(nll, 4)  # buckets 0-3, 4-7, 8-9 (the last one short)
    assert [(b["start"], b["end"]) for b in got] == [(0, 3), (4, 7), (8, 9)]
    for b in got:
        vals = [nll[w, t].item() for w in range(3) for t in range(b["start"], b["end"] + 1)]
        assert b["nll"] == pytest.approx(sum(vals) / len(vals), rel=1e-12)


def test_uses_context_needs_a_fall_over_the_second_half():
    mk = lambda *v: [{"nll": x} for x in v]  # noqa: E731
    assert testbed.uses_context(mk(3.0, 2.5, 2.4, 2.3))
    assert not testbed.uses_context(mk(3.0, 2.5, 2.4, 2.6))   # rises again at the end
    assert not testbed.uses_context(mk(3.0, 2.3, 2.3, 2.3))   # flat after the first tokens


def test_position_nll_cut_context_matches_a_loop():
    """position_nll's `cut` against the definition, one token at a time: the token at t (in the
    bucket starting at s) scored by the model run on the window's tokens s-near .. t only."""
    import model as M
    m = M.build_model(M.get_args("tiny", dim=32, n_layers=2, n_heads=2, vocab_size=64, max_seq_len=32,
                                 n_routed_experts=4, moe_inter_dim=16, inter_dim=32), seed=0).double()
    tokens = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(1)).numpy()
    T, near, bucket = 24, 5, 8
    full, cut = testbed.position_nll(m, tokens, T, 3, 2, near=near, bucket=bucket)
    assert full.shape == cut.shape == (3, T)
    x, y = map(torch.cat, zip(*testbed.data.eval_batches(tokens, 2, T, 2)))   # position_nll's windows
    x, y = x[:3], y[:3]
    with torch.no_grad():
        for t in range(T):
            s = t // bucket * bucket
            lo = max(0, s - near) if s >= near else 0
            logits = m(x[:, lo:t + 1].long())[:, -1].double()
            want = torch.nn.functional.cross_entropy(logits, y[:, t].long(), reduction="none")
            torch.testing.assert_close(cut[:, t].double(), want, rtol=1e-6, atol=1e-6)  # fp32 logits
            if s < near:   # no more context than near: the same as the full window
                torch.testing.assert_close(cut[:, t], full[:, t])
    assert (cut[:, near:] != full[:, near:]).any()   # the cut changes something (not a copy of full)
    g = testbed.context_gain(full, cut, bucket)
    assert g[0]["gain"] == 0 and g[2]["gain"] == pytest.approx((cut - full)[:, 16:].double().mean().item())


def test_uses_distant_context_needs_gain_beyond_noise_in_the_second_half():
    mk = lambda *v: [{"gain": g, "se": se} for g, se in v]  # noqa: E731
    assert testbed.uses_distant_context(mk((0, 0), (0.0, 0.0), (0.05, 0.01), (0.08, 0.02)))
    assert not testbed.uses_distant_context(mk((0, 0), (0.1, 0.0), (0.05, 0.02), (0.08, 0.02)))  # < 3 SE
    assert not testbed.uses_distant_context(mk((0, 0), (0.1, 0.0), (0.005, 0.001), (0.08, 0.02)))  # < 0.01


def slow_long_range(seq, start, min_dist, gram):
    """The probe's definition, one position at a time."""
    out = []
    for i in range(start, len(seq)):
        last = None
        for j in range(i - 1, gram - 2, -1):  # n-grams end at j >= gram - 1
            if seq[j - gram + 1:j + 1] == seq[i - gram + 1:i + 1]:
                last = j
                break
        out.append(last is not None and i - last > min_dist)
    return out


@pytest.mark.parametrize("gram", [1, 2])
def test_long_range_mask_matches_a_loop(gram):
    # hand-made: 7 8 9 at 1-3 and again at 12-14 (11 back), 7 8 again at 15-16 (3 back); 5 at 0 and 19
    seq = [5, 7, 8, 9, 1, 2, 3, 1, 2, 3, 1, 2, 7, 8, 9, 7, 8, 4, 4, 5]
    got = kv.long_range_mask(torch.tensor([seq]), 10, 6, gram)[0].tolist()
    assert got == slow_long_range(seq, 10, 6, gram)
    if gram == 2:  # targets 10..19: only the (7, 8) at 13 (last seen ending at 2, 11 back) is probed
        assert [10 + k for k, v in enumerate(got) if v] == [13, 14]  # (7, 8) and (8, 9), 11 back
    rng = random.Random(0)
    rows = [[rng.randrange(4) for _ in range(60)] for _ in range(3)]  # random rows, batched
    got = kv.long_range_mask(torch.tensor(rows), 30, 8, gram).tolist()
    assert got == [slow_long_range(r, 30, 8, gram) for r in rows]
    assert any(map(any, got))


def test_validity_verdict():
    def rows(*d, se=0.01):  # streaming's NLL increase at budgets 0.1 and 0.5; other policies do not count
        return [{"policy": "streaming", "budget": b, "dnll": x, "dnll_se": se} for b, x in zip((0.1, 0.5), d)] + \
            [{"policy": "keepkv", "budget": 0.1, "dnll": -1.0, "dnll_se": se}]
    ok = kv.validity(rows(0.3, 0.05))
    assert ok["usable"] and ok["failing_budgets"] == [] and ok["message"].startswith("valid")
    bad = kv.validity(rows(0.3, -0.02))
    assert not bad["usable"] and bad["beaten_budgets"] == [0.5] and "NOT USABLE" in bad["message"]
    assert not kv.validity(rows(0.3, 0.0))["usable"]  # a tie is not a win for the full cache
    noisy = kv.validity(rows(0.3, 0.015))  # a win, but by 1.5 standard errors
    assert not noisy["usable"] and noisy["within_noise_budgets"] == [0.5] and "noise" in noisy["message"]
    assert kv.validity(rows(0.3, 0.015), n_se=1.0)["usable"]
    assert not kv.validity([r for r in rows(0.3, 0.3) if r["policy"] != "streaming"])["usable"]  # not measured


# conftest's tiny model; the testbed sets the context and batch itself
TINY_MODEL = " ".join(f"{k} {v}" for k, v in zip(TINY_FLAGS[::2], TINY_FLAGS[1::2])
                      if k not in ("--max-seq-len", "--seq-len", "--batch-size", "--no-compile"))


def _tiny_flags(corpus_dir, steps, copy_steps=0):
    return testbed.train_flags(steps=steps, batch=4, context=64, data_path=corpus_dir, model_flags=TINY_MODEL,
                               copy_steps=copy_steps)


def test_testbed_is_built_once_then_reused(tmp_path, corpus_dir, cache_dir, monkeypatch, one_thread):
    flags = _tiny_flags(corpus_dir, 3)
    folder = testbed.build_testbed(flags, str(tmp_path / "tb"), cache_dir)
    assert testbed.is_finished(folder, flags)
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        weights = f.read()
    import train
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("the cached testbed was trained again"))
    assert testbed.build_testbed(flags, str(tmp_path / "tb"), cache_dir) == folder
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        assert f.read() == weights
    assert testbed.folder_for(str(tmp_path / "tb"), _tiny_flags(corpus_dir, 4)) != folder  # other flags
    assert not testbed.is_finished(folder, _tiny_flags(corpus_dir, 4))

    # the command: loss by position on the cached model, table and JSON
    out = tmp_path / "testbed.json"
    bench.main(["testbed", "--tb-steps", "3", "--tb-batch", "4", "--tb-context", "64", "--tb-data", corpus_dir,
                "--tb-model-flags", TINY_MODEL, "--tb-root", str(tmp_path / "tb"), "--tb-windows", "4",
                "--tb-bucket", "16", "--tb-out", str(out), "--tb-copy-steps", "0"])
    res = json.loads(out.read_text())
    assert res["folder"] == os.path.abspath(folder) and len(res["buckets"]) == 4 and res["windows"] == 4


def test_unfinished_testbed_resumes(tmp_path, corpus_dir, cache_dir, monkeypatch, one_thread):
    import train
    real_main, flags, logged = train.main, _tiny_flags(corpus_dir, 3), []
    monkeypatch.setattr(train, "main", lambda argv: real_main(argv + ["--stop-at", "2"]))  # as if Ctrl-C
    with pytest.raises(RuntimeError, match="stopped before its last step"):
        testbed.build_testbed(flags, str(tmp_path), cache_dir)
    monkeypatch.setattr(train, "main", real_main)
    folder = testbed.build_testbed(flags, str(tmp_path), cache_dir, log=logged.append)
    assert "resuming" in logged[0] and testbed.is_finished(folder, flags)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]  # no step trained twice


def test_bench_kv_end_to_end(trained_checkpoint, corpus_dir, tmp_path, one_thread):
    out = tmp_path / "kv.json"
    bench.main(["kv", "--kv-ckpt", trained_checkpoint, "--kv-data", corpus_dir, "--kv-windows", "2",
                "--kv-batch", "2", "--kv-new", "8", "--kv-prompt", "48", "--kv-probe-dist", "8",
                "--kv-budgets", "0.2,0.5", "--kv-policies", "keepkv,streaming", "--kv-alphas", "0.8",
                "--kv-obs-windows", "", "--kv-thresholds", "", "--kv-skip", "throughput", "--kv-out", str(out)])
    q = json.loads(out.read_text())["quality"]
    assert q["prompt_len"] == 48 and q["windows"] == 2
    assert {(r["policy"], r["budget"]) for r in q["rows"]} == {(p, b) for p in ("keepkv", "streaming")
                                                               for b in (0.2, 0.5)}
    assert all("dnll_probe" in r for r in q["rows"]) and q["probe_dist"] == 8
    assert isinstance(q["validity"]["usable"], bool) and q["validity"]["message"]
    assert len(q["sweep"]) == 3  # alpha 0.8, the convex row and the other reattend
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None  # optional: a plot only with it
    assert (tmp_path / "kv.png").exists() == has_matplotlib


def test_copy_stage_runs_first_and_seeds_the_main_stage(tmp_path, corpus_dir, cache_dir, monkeypatch, one_thread):
    """With a copy stage, build_testbed trains it first (copy-task rows only, its own folder), then
    the main stage starts from its weights (--init-from), once; both are resumable and reused."""
    import train
    import checkpoint
    flags = _tiny_flags(corpus_dir, 2, copy_steps=2)
    copy = testbed.copy_stage_flags(flags)
    get = lambda f, name: f[f.index(name) + 1]  # noqa: E731
    assert get(copy, "--copy-rows") == get(copy, "--batch-size") == str(testbed.COPY_BATCH)
    assert get(copy, "--max-steps") == get(copy, "--copy-steps") == "2" and "--init-from" not in copy
    assert get(copy, "--seq-len") == "64" and get(copy, "--lr") == get(flags, "--lr")
    calls, real_main, real_init = [], train.main, checkpoint.init_weights_from
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or real_main(argv))
    seeded = []
    monkeypatch.setattr(train, "init_weights_from",
                        lambda model, folder, *a: seeded.append(folder) or real_init(model, folder, *a))
    folder = testbed.build_testbed(flags, str(tmp_path), cache_dir)
    assert len(calls) == 2 and get(calls[0], "--out-dir") == os.path.join(folder, "copy-task")
    assert get(calls[1], "--init-from") == os.path.join(folder, "copy-task") == seeded[0]
    assert testbed.is_finished(folder, flags)
    assert testbed.build_testbed(flags, str(tmp_path), cache_dir) == folder and len(calls) == 2
    assert testbed.estimate_minutes(flags) > testbed.estimate_minutes(_tiny_flags(corpus_dir, 2))


def test_recipe_by_device():
    """The CPU recipe is train_flags' defaults (so the CPU testbed's hash, and its cached folder, stay
    the same); on CUDA the copy stage and the main stage are longer and the batch larger."""
    assert testbed.train_flags(**testbed.default_recipe("cpu")) == testbed.train_flags()
    cpu, gpu = testbed.default_recipe("cpu"), testbed.default_recipe("cuda:0")
    assert all(gpu[k] > cpu[k] for k in ("steps", "batch", "copy_steps"))
