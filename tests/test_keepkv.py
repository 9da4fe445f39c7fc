"""Tests for keepkv.py: ZIP exactness and votes in fp64, model-level decoding, budget invariants."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keepkv  # noqa: E402
from keepkv import KVConfig, attend_cache, merge_entries  # noqa: E402
from model import build_model, get_args  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

TINY = dict(vocab_size=300, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=2, n_heads=2,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_seq_len=96)


def random_cache(n=12, d=16, dv=8, dtype=torch.float64, seed=0, logit_scale=1.0, shift=0.0):
    """`shift` moves every key towards q, so all logits are positive (the plain ZIP path)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, d, generator=g, dtype=dtype) * logit_scale
    k = torch.randn(1, 1, n, d, generator=g, dtype=dtype) + shift * q[:, :, None] / q.norm()
    v = torch.randn(1, 1, n, dv, generator=g, dtype=dtype)
    lv = torch.randint(1, 4, (1, 1, n), generator=g).to(dtype).log()   # votes 1..3
    return q, k, v, lv, d ** -0.5


def merged_output(q, k, v, lv, scale, leave, target, mode):
    """Merge the entries `leave` into `target` (indices into the kept ones), using the query's own
    scores as the prediction (alpha = 0), and attend again."""
    n = k.shape[2]
    keep = torch.tensor([i for i in range(n) if i not in leave])
    leave = torch.tensor(leave)
    s = torch.einsum("bhd,bhnd->bhn", q, k) * scale
    parts = [x[:, :, keep] for x in (k, v, lv, s)] + [x[:, :, leave] for x in (k, v, lv, s)]
    t = torch.tensor(target).view(1, 1, -1)
    nk, nv, nlv, ns, fb = merge_entries(*parts, t, torch.ones_like(t, dtype=torch.bool), mode)
    return attend_cache(q, nk, nv, nlv, torch.tensor([len(keep)]), scale), fb


@pytest.mark.parametrize("shift", [8.0, 0.0])  # 8: all logits > 0, plain ZIP; 0: mixed signs
@pytest.mark.parametrize("leave,target", [([7], [2]), ([3, 8, 11], [0, 0, 0]), ([1, 5, 9, 10], [2, 2, 6, 0])])
def test_zip_exact_convex_and_eviction_not(leave, target, shift):
    q, k, v, lv, scale = random_cache(shift=shift)
    full = attend_cache(q, k, v, lv, torch.tensor([k.shape[2]]), scale)
    zip_out, fb = merged_output(q, k, v, lv, scale, leave, target, "zip")
    if shift:
        assert not fb.any()                                            # the key rescale itself
    assert (zip_out - full).abs().max() < 1e-10
    convex, _ = merged_output(q, k, v, lv, scale, leave, target, "convex")
    keep = [i for i in range(k.shape[2]) if i not in leave]
    evicted = attend_cache(q, k[:, :, keep], v[:, :, keep], lv[:, :, keep], torch.tensor([len(keep)]), scale)
    assert (convex - full).abs().max() > 1e-3
    assert (evicted - full).abs().max() > 1e-3


def test_votes_equal_copies():
    q, k, v, lv, scale = random_cache()
    lv = torch.zeros_like(lv)
    lv[..., 4] = math.log(3)
    voted = attend_cache(q, k, v, lv, torch.tensor([12]), scale)
    idx = torch.tensor(list(range(12)) + [4, 4])                       # entry 4 twice more
    copies = attend_cache(q, k[:, :, idx], v[:, :, idx], torch.zeros(1, 1, 14, dtype=k.dtype),
                          torch.tensor([14]), scale)
    assert (voted - copies).abs().max() < 1e-12


def test_zip_safe_with_huge_and_tiny_logits():
    # logits in the hundreds: exp overflows fp32 above ~88, the log-space merge must not
    q, k, v, lv, scale = random_cache(dtype=torch.float32, logit_scale=200.0)
    full = attend_cache(q, k, v, lv, torch.tensor([12]), scale)
    out, _ = merged_output(q, k, v, lv, scale, [3, 8, 11], [0, 1, 1], "zip")
    assert torch.isfinite(out).all() and (out - full).abs().max() < 1e-3
    # logits near 0: the key rescale is 0/0, the guarded fall-back must stay exact
    q, k, v, lv, scale = random_cache(logit_scale=1e-6)
    full = attend_cache(q, k, v, lv, torch.tensor([12]), scale)
    out, fb = merged_output(q, k, v, lv, scale, [3, 8], [0, 0], "zip")
    assert fb.any() and torch.isfinite(out).all() and (out - full).abs().max() < 1e-10


def test_prefill_ema_matches_the_decode_recurrence():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, 10, 8, generator=g, dtype=torch.float64) for _ in range(2))
    alpha, w = 0.7, 4
    got = keepkv.ema_window_scores(q, k, 0.5, alpha, w)[0, 0]
    logits = (q[0, 0] @ k[0, 0].T) * 0.5
    for j in range(10):
        S = None
        for i in range(max(j, 10 - w), 10):
            s = logits[i, j].exp()
            S = s if S is None else alpha * S + (1 - alpha) * s
        assert abs(got[j].item() - S.log().item()) < 1e-12
    last = keepkv.ema_window_scores(q, k, 0.5, 0.0, w)[0, 0]         # alpha = 0: the last query
    assert (last - logits[-1]).abs().max() < 1e-12


def tiny_model(dtype=torch.float32, sharp=True):
    model = build_model(get_args("tiny", **TINY), seed=0).to(dtype).eval()
    if sharp:  # an untrained model's logits are all near 0; spread them so merges matter
        with torch.no_grad():
            for layer in model.layers:
                layer.attn.wq.weight.mul_(10)
                layer.attn.wkv_a.weight.mul_(10)
                layer.attn.wkv_b.weight.mul_(5)
    return model


def run(model, tokens, prompt_len, cfg, n_steps, track=False):
    """Prefill, then decode n_steps tokens one at a time; returns the logits [B, P + n_steps, V]."""
    caches = keepkv.make_caches(model, tokens.shape[0], prompt_len, cfg, n_steps, track=track)
    out = [model(tokens[:, :prompt_len], torch.arange(prompt_len), caches)]
    for t in range(prompt_len, prompt_len + n_steps):
        out.append(model(tokens[:, t:t + 1], torch.tensor([t]), caches))
    return torch.cat(out, 1), caches


def test_full_policy_equals_forward():
    model = tiny_model()
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
        got, _ = run(model, tokens, 30, KVConfig(policy="full"), 10)
    assert (got - ref).abs().max() < 1e-4


def test_alpha0_merge_step_equals_full_cache_fp64():
    model = tiny_model(torch.float64)
    tokens = torch.randint(0, 300, (2, 34), generator=torch.Generator().manual_seed(0))
    P = 30
    with torch.no_grad():
        ref, _ = run(model, tokens, P, KVConfig(policy="full"), 1)
        # budget 1.0 keeps the whole prompt, so the first decoded token forces one merge per head
        cfg = dict(budget=1.0, alpha=0.0, threshold=-1.0)
        zip_, caches = run(model, tokens, P, KVConfig(policy="keepkv", **cfg), 1, track=True)
        convex, _ = run(model, tokens, P, KVConfig(policy="convex", **cfg), 1)
    stats = keepkv.cache_stats(caches)
    assert stats["merges"] == 2 * 2 * 2 == stats["removals"]          # layers x batch x heads
    assert (zip_[:, P] - ref[:, P]).abs().max() < 1e-10
    assert (convex[:, P] - ref[:, P]).abs().max() > 1e-6


@pytest.mark.parametrize("policy", ["keepkv", "convex", "h2o", "snapkv", "streaming"])
def test_budget_invariants(policy):
    model = tiny_model()
    P, n_new, cfg = 60, 6, KVConfig(policy=policy, budget=0.3)
    C = keepkv.capacity(P, cfg)
    assert C == 18
    tokens = torch.randint(0, 300, (2, P + n_new), generator=torch.Generator().manual_seed(0))
    caches = keepkv.make_caches(model, 2, P, cfg)
    with torch.no_grad():
        model(tokens[:, :P], torch.arange(P), caches)
        for t in range(P - 1, P + n_new):
            if t >= P:
                model(tokens[:, t:t + 1], torch.tensor([t]), caches)
            for c in caches:
                live = c.live()
                assert (live.sum(-1) == C).all()                     # compressed to, then held at, C
                pos = c.pos.masked_fill(~live, -1)
                for must in list(range(cfg.n_sink)) + list(range(t + 1 - cfg.window, t + 1)):
                    assert (pos == must).any(-1).all(), f"position {must} missing at step {t}"


def test_cache_bytes_at_budget_0_1():
    a = get_args("tiny", max_seq_len=4160)
    cfg = KVConfig(budget=0.1)
    cache = keepkv.KeepKVCache(1, 4096, a.n_heads, a.qk_head_dim, a.v_head_dim, cfg)
    full = 1 * 4096 * a.n_heads * (a.qk_head_dim + a.v_head_dim) * 4
    assert cache.capacity == 410 and cache.nbytes() / full <= 0.12


def test_config_errors():
    with pytest.raises(ValueError, match="unknown KV policy"):
        KVConfig(policy="lru")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="budget"):
            KVConfig(budget=bad)
