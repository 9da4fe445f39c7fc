"""Tests for keepkv.py: ZIP exactness and votes in fp64, the slots and the selection against slow
references, H2O and SnapKV against slow simulations, model-level decoding, budget invariants."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keepkv  # noqa: E402
import kvselect  # noqa: E402
from keepkv import NEG, CacheSlots, KVConfig, attend_cache, merge_entries  # noqa: E402
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


def keys_with_logits(q, logits, scale, seed=0, noise=1.0):
    """Keys [1, 1, n, d] with q.k * scale = logits exactly (in exact arithmetic), plus random parts
    orthogonal to q [1, 1, d]."""
    g = torch.Generator().manual_seed(seed)
    u = q[0, 0] / q[0, 0].norm()
    r = torch.randn(len(logits), q.shape[-1], generator=g, dtype=q.dtype) * noise
    r = r - (r @ u)[:, None] * u
    along = torch.tensor(logits, dtype=q.dtype)[:, None] / (scale * q[0, 0].norm())
    return (along * u + r)[None, None]


@pytest.mark.parametrize("logits,fallback", [([5.0, 6.0, 4.0], False),         # the key rescale
                                             ([0.5, -3.0, -2.0], True),        # L < 0 < lbar: a flip
                                             ([4e-4, -4e-4, 5e-4], True)])     # |lbar| < eps: 0/0
def test_merge_stores_the_logit_the_merged_key_has(logits, fallback):
    """alpha = 0: ln sigma are one query's logits. The stored ln sigma_r must be the logit k_r
    really has (L on the main path, lbar for the fall-back and convex), and for ZIP ln p_r +
    ln sigma_r must be ln sum p_i sigma_i, the mass the parts had, in both branches (the fall-back
    used to store L)."""
    g = torch.Generator().manual_seed(0)
    d = 8
    q = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    scale = d ** -0.5
    k = keys_with_logits(q, logits, scale)
    v = torch.randn(1, 1, 3, 4, generator=g, dtype=torch.float64)
    lv = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64).log().view(1, 1, 3)
    ls = torch.einsum("bhd,bhnd->bhn", q, k) * scale
    assert (ls[0, 0] - torch.tensor(logits, dtype=torch.float64)).abs().max() < 1e-12
    mass = math.log(sum(math.exp(lv[0, 0, i].item() + ls[0, 0, i].item()) for i in range(3)))
    kept, leaving = [x[:, :, :1] for x in (k, v, lv, ls)], [x[:, :, 1:] for x in (k, v, lv, ls)]
    target = torch.zeros(1, 1, 2, dtype=torch.long)
    for mode in ("zip", "convex"):
        everything = torch.ones_like(target, dtype=torch.bool)
        nk, _, nlv, nls, fb = merge_entries(*kept, *leaving, target, everything, mode)
        assert abs(scale * (q[0, 0] @ nk[0, 0, 0]).item() - nls.item()) < 1e-10, mode
        if mode == "zip":
            assert fb.item() == fallback
            assert abs(nlv.item() + nls.item() - mass) < 1e-10


@pytest.mark.parametrize("leaving", ["near-duplicate", "dominant"])
def test_zip_exact_at_huge_logits_when_the_dominant_entry_merges(leaving):
    """Logits near 1.5e3 (exp overflows even fp64 above ~709). Entry 0 has the largest logit and
    entry 1 is its near-duplicate key; one of the two leaves into the other. ZIP keeps the output
    to 1e-10, nothing goes inf or nan; convex merging and eviction move it by more than 1e-2."""
    d, scale = 16, 16 ** -0.5
    q = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    logits = [1500.0, 1499.0, 1499.6, 1498.7, 1499.3, 1497.5, 1200.0, -1300.0]
    k = keys_with_logits(q, logits, scale, noise=0.5)
    k[:, :, 1] = k[:, :, 0] + (logits[1] - logits[0]) / (scale * q.norm() ** 2) * q  # entry 0 moved along q
    n = len(logits)
    v = torch.randn(1, 1, n, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lv = torch.zeros(1, 1, n, dtype=torch.float64)
    logit = torch.einsum("bhd,bhnd->bhn", q, k) * scale
    assert logit.argmax() == 0 and logit.abs().max() > 1e3
    full = attend_cache(q, k, v, lv, torch.tensor([n]), scale)
    leave, target = ([1], [0]) if leaving == "near-duplicate" else ([0], [0])   # kept index 0: entry 0 or 1
    zip_out, fb = merged_output(q, k, v, lv, scale, leave, target, "zip")
    convex, _ = merged_output(q, k, v, lv, scale, leave, target, "convex")
    keep = [i for i in range(n) if i not in leave]
    evicted = attend_cache(q, k[:, :, keep], v[:, :, keep], lv[:, :, keep], torch.tensor([len(keep)]), scale)
    rel = lambda o: ((o - full).norm() / full.norm()).item()  # noqa: E731
    assert all(torch.isfinite(o).all() for o in (full, zip_out, convex, evicted))
    assert not fb.any() and rel(zip_out) < 1e-10
    assert rel(convex) > 1e-2 and rel(evicted) > 1e-2
    out32, _ = merged_output(*(x.float() for x in (q, k, v, lv)), scale, leave, target, "zip")
    assert torch.isfinite(out32).all() and rel(out32.double()) < 1e-3     # fp32: finite, fp32-close


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
        cfg = dict(budget=1.0, alpha=0.0, threshold=-1.0, reattend=True)  # the step sees its own merge
        zip_, caches = run(model, tokens, P, KVConfig(policy="keepkv", **cfg), 1, track=True)
        convex, _ = run(model, tokens, P, KVConfig(policy="convex", **cfg), 1)
    stats = keepkv.cache_stats(caches)
    assert stats["merges"] == 2 * 2 * 2 == stats["removals"]          # layers x batch x heads
    assert (zip_[:, P] - ref[:, P]).abs().max() < 1e-10
    assert (convex[:, P] - ref[:, P]).abs().max() > 1e-6


BUDGET_CASES = [dict(policy=p) for p in keepkv.POLICIES if p != "full"] + \
    [dict(policy="keepkv", select=s, merge_at=m) for s, m in (("snapkv", "both"), ("streaming", "prefill"))] + \
    [dict(policy="convex", merge_at="both", recent=0.2)]


@pytest.mark.parametrize("case", BUDGET_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_budget_invariants(case):
    """Every policy at one budget holds the same Sk live entries after the prefill and after each
    decode step (snapkv included: it holds Sk rather than grow), with its recent part all there."""
    model = tiny_model()
    P, n_new, cfg = 60, 6, KVConfig(budget=0.3, snap_window=8, threshold=0.0, **case)
    Sk = keepkv.capacity(P, cfg)
    assert Sk == 18 and keepkv.capacity(P, cfg, n_new) == Sk
    tokens = torch.randint(0, 300, (2, P + n_new), generator=torch.Generator().manual_seed(0))
    caches = keepkv.make_caches(model, 2, P, cfg, n_new)
    sel = kvselect.selection(cfg)
    recent = {"h2o": int(Sk * cfg.recent), "snapkv": cfg.snap_window, "streaming": Sk - cfg.n_sink}[sel]
    sinks = cfg.n_sink if sel == "streaming" else 0
    with torch.no_grad():
        model(tokens[:, :P], torch.arange(P), caches)
        for t in range(P - 1, P + n_new):
            if t >= P:
                model(tokens[:, t:t + 1], torch.tensor([t]), caches)
            for c in caches:
                live = c.live()
                assert (live.sum(-1) == Sk).all()                     # compressed to Sk, then held there
                pos = c.pos.masked_fill(~live, -1)
                for must in list(range(sinks)) + list(range(t + 1 - recent, t + 1)):
                    assert (pos == must).any(-1).all(), f"position {must} missing at step {t}"


def test_cache_bytes_at_budget_0_1():
    a = get_args("tiny", max_seq_len=4160)
    cfg = KVConfig(budget=0.1)
    cache = keepkv.KeepKVCache(1, 4096, a.n_heads, a.qk_head_dim, a.v_head_dim, cfg)
    full = 1 * 4096 * a.n_heads * (a.qk_head_dim + a.v_head_dim) * 4
    assert cache.capacity == 410 and cache.nbytes() / full <= 0.12


@pytest.mark.parametrize("dtype,meta_bytes", [(torch.float64, 8), (torch.bfloat16, 4)])
def test_slots_nbytes_is_the_sum_of_its_slots(dtype, meta_bytes):
    B, Hk, S, dk, dv = 2, 3, 7, 10, 6
    slots = CacheSlots(B, Hk, S, {"k": dk, "v": dv}, dtype)
    item = torch.tensor([], dtype=dtype).element_size()
    # keys and values, then ln p and ln sigma (fp32 at least), then int32 positions; `lengths` is per row
    assert slots.nbytes() == B * Hk * S * ((dk + dv) * item + 2 * meta_bytes + 4)
    for policy, n_meta in (("h2o", 2), ("keepkv", 3)):   # + ZIP's predicted ln sigma when merging
        cache = keepkv.KeepKVCache(B, 60, Hk, dk, dv, KVConfig(policy=policy, budget=0.1), dtype=dtype)
        assert cache.nbytes() == B * Hk * (cache.capacity + 1) * ((dk + dv) * item + n_meta * meta_bytes + 4)
    assert cache.log_score is cache.slots.log_score


def test_slots_write_token_fills_the_first_free_slot():
    B, Hk, S, dk, dv = 2, 3, 6, 5, 4
    g = torch.Generator().manual_seed(0)
    slots = CacheSlots(B, Hk, S, {"k": dk, "v": dv}, torch.float64)
    for t in range(4):
        # a random pattern of free slots, at least one per row
        lv = torch.randn(B, Hk, S, generator=g, dtype=torch.float64)
        lv[torch.rand(B, Hk, S, generator=g) < 0.5] = NEG
        lv[..., -1] = NEG
        slots.log_votes.copy_(lv)
        slots.log_score.copy_(torch.randn(B, Hk, S, generator=g, dtype=torch.float64))
        ref = {n: getattr(slots, n).clone() for n in ("k", "v", "log_votes", "log_score", "pos")}
        k, v = (torch.randn(B, Hk, d, generator=g, dtype=torch.float64) for d in (dk, dv))
        slot = slots.write_token((k, v), torch.tensor(t))
        for b in range(B):
            for h in range(Hk):
                n = next(i for i in range(S) if ref["log_votes"][b, h, i] == NEG)
                assert slot[b, h, 0] == n
                ref["k"][b, h, n], ref["v"][b, h, n] = k[b, h], v[b, h]
                ref["log_votes"][b, h, n], ref["pos"][b, h, n] = 0.0, t       # one vote; ln sigma untouched
        for name, want in ref.items():
            assert torch.equal(getattr(slots, name), want), name
    # nothing ever leaves: the first free slot is the position, and the in-order write agrees
    a, b = (CacheSlots(B, Hk, S, {"k": dk, "v": dv}) for _ in range(2))
    for t in range(S):
        k, v = torch.randn(B, Hk, dk, generator=g), torch.randn(B, Hk, dv, generator=g)
        assert (a.write_token((k, v), torch.tensor(t)) == t).all()
        assert (b.write_token((k, v), torch.tensor(t), in_order=True) == t).all()
    for name in ("k", "v", "log_votes", "log_score", "pos"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.live().all()
    a.reset()
    assert not a.live().any() and (a.log_score == NEG).all()


def test_slots_rows_round_trip_and_free():
    B, Hk, S = 1, 2, 5
    slots = CacheSlots(B, Hk, S, {"k": 3, "v": 2}, torch.float64, pred=True)
    r = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    slots.write_prefix(k=r(B, Hk, S, 3), v=r(B, Hk, S, 2), log_votes=torch.zeros(B, Hk, S, dtype=torch.float64),
                       log_score=r(B, Hk, S), pos=torch.arange(S, dtype=torch.int32).expand(B, Hk, S),
                       log_pred=r(B, Hk, S))
    idx = torch.tensor([[[3], [1]]])
    rows = slots.rows(idx)
    for x, row in zip((slots.k, slots.v, slots.log_votes, slots.log_pred), rows):
        assert torch.equal(row[0, 0, 0], x[0, 0, 3]) and torch.equal(row[0, 1, 0], x[0, 1, 1])
    before = [x.clone() for x in (slots.k, slots.v, slots.log_votes, slots.log_pred)]
    slots.put_rows(idx, [r + 1 for r in rows])
    after = [slots.k, slots.v, slots.log_votes, slots.log_pred]
    for x0, x1 in zip(before, after):
        changed = (x0 != x1).reshape(B, Hk, S, -1).any(-1)
        assert changed[0, 0].tolist() == [False, False, False, True, False]
        assert changed[0, 1].tolist() == [False, True, False, False, False]
    slots.free(idx, torch.tensor([[[True], [False]]]))
    assert slots.live()[0, 0].tolist() == [True, True, True, False, True] and slots.live()[0, 1].all()


@pytest.mark.parametrize("case", [dict(policy="h2o"), dict(policy="h2o", recent=0.3), dict(policy="snapkv"),
                                  dict(policy="streaming"), dict(policy="keepkv", select="snapkv"),
                                  dict(policy="convex", select="streaming")], ids=str)
def test_selection_matches_a_slow_reference(case):
    cfg = KVConfig(n_sink=2, snap_window=5, **case)
    sel = kvselect.selection(cfg)
    g = torch.Generator().manual_seed(2)
    B, Hk, T, Sk = 2, 3, 20, 8
    pos = torch.arange(T, dtype=torch.int32).expand(B, Hk, T)
    ls = torch.randn(B, Hk, T, generator=g)
    live = torch.rand(B, Hk, T, generator=g) < 0.7

    def hold(b, h, i):
        return float(i) if sel == "streaming" else ls[b, h, i]

    keep, leave = keepkv.split_prompt(cfg, ls, pos, T - 1, Sk)
    out = keepkv.leaving_slot(cfg, ls, pos, live, T - 1, capacity=Sk)
    recent = {"h2o": int(Sk * cfg.recent), "snapkv": 5, "streaming": 1}[sel]   # h2o: a share of Sk
    sinks = 2 if sel == "streaming" else 0
    for b in range(B):
        for h in range(Hk):
            pinned = [i for i in range(T) if i < sinks or i > T - 1 - recent]
            rest = sorted((i for i in range(T) if i not in pinned), key=lambda i: -hold(b, h, i))
            assert keep[b, h].tolist() == sorted(pinned + rest[:Sk - len(pinned)])
            assert sorted(keep[b, h].tolist() + leave[b, h].tolist()) == list(range(T))
            cand = [i for i in range(T) if live[b, h, i] and i not in pinned]
            assert out[b, h, 0] == min(cand, key=lambda i: hold(b, h, i))


def test_alpha0_keepkv_step_equals_the_cache_before_removal():
    """With alpha = 0 a merged step gives what the Sk + 1 entries before the removal give (not the
    full cache: earlier steps already merged); convex merging and eviction do not."""
    B, H, D, P, n = 2, 3, 8, 40, 10
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, D, generator=g, dtype=torch.float64)   # clustered keys: merges happen
    which = torch.randint(0, 4, (B, P + n, H), generator=g)
    k = centres[which] + 0.3 * torch.randn(B, P + n, H, D, generator=g, dtype=torch.float64)
    q, v = (torch.randn(B, P + n, H, D, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    errs = {}
    for policy in ("keepkv", "convex", "h2o"):
        cfg = KVConfig(policy=policy, budget=0.3, alpha=0.0, threshold=-1.0, reattend=True)
        cache = keepkv.KeepKVCache(B, P, H, D, D, cfg, n, torch.float64, track=True)
        cache.attend(q[:, :P], k[:, :P], v[:, :P], torch.arange(P), D ** -0.5)
        errs[policy] = 0.0
        for t in range(P, P + n):
            # the cache before the removal: every slot as it stands, plus the new token with one vote
            ck, cv = (torch.cat([c, x[:, t, :, None]], 2) for c, x in ((cache.k, k), (cache.v, v)))
            clv = torch.cat([cache.log_votes, torch.zeros(B, H, 1, dtype=torch.float64)], 2)
            ref = attend_cache(q[:, t], ck, cv, clv, torch.tensor([ck.shape[2]] * B), D ** -0.5)
            step = (x[:, t:t + 1] for x in (q, k, v))
            out = cache.attend(*step, torch.tensor([t]), D ** -0.5)[:, 0]
            errs[policy] = max(errs[policy], (out - ref).abs().max().item())
        stats = keepkv.cache_stats([cache])
        assert stats["removals"] == n * B * H
        if policy in keepkv.MERGING:
            assert stats["merges"] == stats["removals"]
    assert errs["keepkv"] < 1e-10
    assert errs["convex"] > 1e-6 and errs["h2o"] > 1e-3


def test_config_errors():
    with pytest.raises(ValueError, match="unknown KV policy"):
        KVConfig(policy="lru")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="budget"):
            KVConfig(budget=bad)
    with pytest.raises(ValueError, match="pool must be odd.*use 3"):
        KVConfig(pool=2)
    with pytest.raises(ValueError, match="pool must be odd.*use 5"):
        KVConfig(pool=4)
    with pytest.raises(ValueError, match="snap_window >= 1"):
        KVConfig(snap_window=0)
    with pytest.raises(ValueError, match="unknown KV selection 'lru'"):
        KVConfig(select="lru")
    with pytest.raises(ValueError, match="unknown merge_at"):
        KVConfig(merge_at="never")
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match="recent must be in"):
            KVConfig(recent=bad)
    for policy in ("h2o", "snapkv", "keepkv"):  # the recent part is a share of Sk: no silent default
        with pytest.raises(ValueError, match="needs capacity"):
            kvselect.pinned(KVConfig(policy=policy), torch.arange(5), 4)
    # what the check prevents: an even kernel pools T keys into T + 1 scores
    mass = torch.rand(1, 1, 7)
    assert torch.nn.functional.avg_pool1d(mass, 2, stride=1, padding=1).shape[-1] == 8


def random_qkv(B, T, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * 2 for _ in range(3)]


def slow_softmax_row(q, k, scale, entries):
    """Attention of query q [D] over the keys k [T, D] at `entries` (a list of positions), explicit."""
    logits = [(q @ k[j]).item() * scale for j in entries]
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    return {j: w / sum(e) for j, w in zip(entries, e)}


def live_positions(cache, b, h):
    return sorted(cache.pos[b, h][cache.live()[b, h]].tolist())


def decode_like_slow_h2o(cache, sims, q, k, v, P, n, n_recent, scale, Sk=None):
    """Decode n tokens after a P-token prompt and follow H2O's rule slowly beside the cache: each new
    token's attention adds to every kept entry's accumulated score (sims[b, h]: position -> score),
    then the lowest-scored entry outside the last n_recent positions leaves. Same entries kept."""
    for t in range(P, P + n):
        cache.attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], torch.tensor([t]), scale)
        assert Sk is None or (cache.live().sum(-1) == Sk).all()
        for (b, h), acc in sims.items():
            acc[t] = 0.0
            for j, a in slow_softmax_row(q[b, t, h], k[b, :, h], scale, sorted(acc)).items():
                acc[j] += a
            del acc[min((j for j in acc if j <= t - n_recent), key=lambda j: acc[j])]
            assert live_positions(cache, b, h) == sorted(acc), f"step {t}"


def test_h2o_half_recent_half_heavy_matches_a_slow_simulation():
    """H2O as its paper has it: the most recent Sk // 2 and the Sk - Sk // 2 largest accumulated
    attentions among the rest (every prompt query's softmax, summed), no sinks; then each decoded
    token's attention adds on, and the lightest entry outside the recent Sk // 2 leaves."""
    B, H, D, P, n = 2, 2, 8, 30, 6
    q, k, v = random_qkv(B, P + n, H, D, seed=5)
    scale = D ** -0.5
    cfg = KVConfig(policy="h2o", budget=0.4)
    Sk = keepkv.capacity(P, cfg)
    n_recent = Sk // 2
    assert (Sk, n_recent) == (12, 6)
    cache = keepkv.KeepKVCache(B, P, H, D, D, cfg, n, torch.float64)
    cache.attend(q[:, :P], k[:, :P], v[:, :P], torch.arange(P), scale)
    sims = {}
    for b in range(B):
        for h in range(H):
            acc = dict.fromkeys(range(P), 0.0)
            for i in range(P):
                for j, a in slow_softmax_row(q[b, i, h], k[b, :, h], scale, list(range(i + 1))).items():
                    acc[j] += a
            heavy = sorted(range(P - n_recent), key=lambda j: -acc[j])[:Sk - n_recent]
            assert live_positions(cache, b, h) == sorted(heavy + list(range(P - n_recent, P)))
            sims[b, h] = {j: acc[j] for j in live_positions(cache, b, h)}
    decode_like_slow_h2o(cache, sims, q, k, v, P, n, n_recent, scale)


@pytest.mark.parametrize("budget", [0.6, 0.25])  # Sk = 48 > snap_window = 32; Sk = 20 < 32
def test_snapkv_prefill_matches_a_slow_reference(budget):
    """SnapKV as its code has it: the last 32 prompt queries' softmax attention summed on each key
    before them, average-pooled over 5 keys (zero padding counted), the top Sk - 32 kept with the
    whole window (Sk < 32: the last Sk)."""
    B, H, D, P = 1, 2, 8, 80
    q, k, v = random_qkv(B, P, H, D, seed=6)
    scale = D ** -0.5
    cfg = KVConfig(policy="snapkv", budget=budget)
    Sk, Tw = keepkv.capacity(P, cfg), cfg.snap_window
    cache = keepkv.KeepKVCache(B, P, H, D, D, cfg, 0, torch.float64)
    cache.attend(q, k, v, torch.arange(P), scale)
    for b in range(B):
        for h in range(H):
            votes = [0.0] * (P - Tw)
            for i in range(P - Tw, P):
                for j, a in slow_softmax_row(q[b, i, h], k[b, :, h], scale, list(range(i + 1))).items():
                    if j < P - Tw:
                        votes[j] += a
            pooled = [sum(votes[u] for u in range(j - 2, j + 3) if 0 <= u < P - Tw) / 5 for j in range(P - Tw)]
            top = sorted(range(P - Tw), key=lambda j: -pooled[j])[:max(0, Sk - Tw)]
            want = sorted(top + list(range(P - min(Tw, Sk), P)))
            assert live_positions(cache, b, h) == want
            assert torch.equal(cache.k[b, h, :Sk], k[b, want, h])
            assert torch.equal(cache.v[b, h, :Sk], v[b, want, h])


def test_snapkv_holds_capacity_after_its_prefill():
    """SnapKV here holds Sk: after its prefill (the kept set of the test above), each decoded token's
    attention adds on to the scores (the pooled votes for the keys before the window, the window's
    own attention for its keys) and the lightest entry outside the last min(32, Sk) positions leaves."""
    B, H, D, P, n = 1, 2, 8, 80, 5
    q, k, v = random_qkv(B, P + n, H, D, seed=7)
    scale = D ** -0.5
    cfg = KVConfig(policy="snapkv", budget=0.5)
    Sk, Tw = keepkv.capacity(P, cfg), cfg.snap_window
    cache = keepkv.KeepKVCache(B, P, H, D, D, cfg, n, torch.float64)
    assert cache.capacity == keepkv.capacity(P, cfg, n) == Sk == cache.k.shape[2] - 1 and Sk > Tw
    cache.attend(q[:, :P], k[:, :P], v[:, :P], torch.arange(P), scale)
    sims = {}
    for b in range(B):
        for h in range(H):
            votes = [0.0] * P
            for i in range(P - Tw, P):
                for j, a in slow_softmax_row(q[b, i, h], k[b, :, h], scale, list(range(i + 1))).items():
                    votes[j] += a
            score = {j: sum(votes[u] for u in range(j - 2, j + 3) if 0 <= u < P - Tw) / 5 if j < P - Tw
                     else votes[j] for j in range(P)}
            top = sorted(range(P - Tw), key=lambda j: -score[j])[:Sk - Tw]
            assert live_positions(cache, b, h) == sorted(top + list(range(P - Tw, P)))
            sims[b, h] = {j: score[j] for j in live_positions(cache, b, h)}
    decode_like_slow_h2o(cache, sims, q, k, v, P, n, Tw, scale, Sk)


def _decode_all(model, tokens, P, cfg, make=keepkv.make_caches):
    caches = make(model, tokens.shape[0], P, cfg, tokens.shape[1] - P, track=True)
    with torch.no_grad():
        out = [model(tokens[:, :P], torch.arange(P), caches)]
        for t in range(P, tokens.shape[1]):
            out.append(model(tokens[:, t:t + 1], torch.tensor([t]), caches))
    return torch.cat(out, 1), caches


@pytest.mark.parametrize("select", kvselect.SELECTIONS)
def test_merging_off_is_its_selection_exactly(select):
    """keepkv and convex with merge_at = "none" ARE their selection policy: the same logits, bit
    for bit, at every step. With merging on (every leaving entry merges) they differ."""
    model = tiny_model()
    tokens = torch.randint(0, 300, (2, 60), generator=torch.Generator().manual_seed(4))
    P, base = 44, dict(budget=0.3, snap_window=8, threshold=-1.0)
    ref, _ = _decode_all(model, tokens, P, KVConfig(policy=select, **base))
    for policy in keepkv.MERGING:
        off, _ = _decode_all(model, tokens, P, KVConfig(policy=policy, select=select, merge_at="none", **base))
        assert torch.equal(off, ref), policy
        on, caches = _decode_all(model, tokens, P, KVConfig(policy=policy, select=select, **base))
        assert keepkv.cache_stats(caches)["merges"] > 0 and (on[:, P:] - ref[:, P:]).abs().max() > 1e-4


def test_merge_at_prefill_decode_both():
    """merge_at decides which phase merges: the prefill's share of merged leavers, the decode merges."""
    model = tiny_model()
    tokens = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(5))
    got = {}
    for at in keepkv.MERGE_AT:
        _, caches = _decode_all(model, tokens, 40, KVConfig(budget=0.3, merge_at=at, threshold=-1.0))
        s = keepkv.cache_stats(caches)
        got[at] = (s["prefill_merge_frac"] > 0, s["merges"] > 0)
    assert got == {"decode": (False, True), "prefill": (True, False), "both": (True, True), "none": (False, False)}


@pytest.mark.parametrize("shift", [8.0, 0.0])
def test_zip_without_votes_keeps_one_vote_and_the_output(shift):
    """votes=False: the merged entry keeps p = 1 and the key alone carries the mass; still exact on
    the main path (all logits > 0: shift 8), and wherever it took no fall-back."""
    q, k, v, _, scale = random_cache(shift=shift)
    lv = torch.zeros(1, 1, k.shape[2], dtype=k.dtype)
    full = attend_cache(q, k, v, lv, torch.tensor([k.shape[2]]), scale)
    leave, keep = [3, 8], [i for i in range(k.shape[2]) if i not in (3, 8)]
    s = torch.einsum("bhd,bhnd->bhn", q, k) * scale
    t = torch.tensor([[[0, 0]]])
    nk, nv, nlv, ns, fb = merge_entries(*[x[:, :, keep] for x in (k, v, lv, s)], *[x[:, :, leave] for x in (k, v, lv, s)],
                                        t, torch.ones_like(t, dtype=torch.bool), "zip", votes=False)
    assert (nlv == 0).all()
    out = attend_cache(q, nk, nv, nlv, torch.tensor([len(keep)]), scale)
    if not fb.any():
        assert (out - full).abs().max() < 1e-10
    if shift:
        assert not fb.any()
