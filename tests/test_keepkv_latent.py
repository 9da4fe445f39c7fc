"""KeepKV on the latent cache: exact per-head mass, the least-squares value, and the cache against
the model's own full forward and full latent cache. fp64 wherever exactness is claimed."""
import math

import pytest
import torch

import keepkv
import keepkv_latent as kl
import kvselect
from model import build_model, get_args

H, C, DR, DV = 4, 12, 4, 5          # H * DV = 20 > C: one shared c_r cannot serve every head


def _logits(Q, kv, scale):
    return torch.einsum("bhd,bnd->bhn", Q, kv) * scale


def _scene(seed, n_kept=6, n_leave=3, B=2):
    """Kept and leaving latent entries whose ln sigma are the logits of a query Q (alpha = 0)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    Q, scale = r(B, H, C + DR) * 2, 0.7
    kv, kv_in = r(B, n_kept, C + DR), r(B, n_leave, C + DR)
    ln_p, ln_p_in = r(B, H, n_kept).abs().neg(), r(B, H, n_leave).abs().neg()   # votes <= 1 (any works)
    w_v = r(H, DV, C)
    target = torch.randint(0, n_kept, (B, n_leave), generator=g)
    mask = torch.ones(B, n_leave, dtype=torch.bool)
    mask[0, -1] = False                                                      # one row that is evicted
    kept = (kv, ln_p, _logits(Q, kv, scale))
    leaving = (kv_in, ln_p_in, _logits(Q, kv_in, scale))
    ln_z = torch.logsumexp(torch.cat([kept[1] + kept[2], leaving[1] + leaving[2]], -1), -1)
    return kept, leaving, target, mask, Q, ln_z, w_v, scale


def _group_weights(kept, leaving, target, mask, b, j):
    """Slow path: the (entry, per-head weight w_hi) list of target j in row b."""
    (kv, ln_p, ln_s), (kv_in, ln_p_in, ln_s_in) = kept, leaving
    rows = [(kv[b, j], (ln_p[b, :, j] + ln_s[b, :, j]).exp())]
    rows += [(kv_in[b, i], (ln_p_in[b, :, i] + ln_s_in[b, :, i]).exp())
             for i in range(target.shape[1]) if mask[b, i] and target[b, i] == j]
    return rows


def test_merge_latent_keeps_every_heads_mass_and_solves_the_least_squares():
    kept, leaving, target, mask, Q, ln_z, w_v, scale = _scene(0)
    (kv_r, ln_p_r, ln_s_r), touched, residual = kl.merge_latent(kept, leaving, target, mask, Q, ln_z, w_v, scale)
    assert touched.sum() >= 3
    for b in range(Q.shape[0]):
        for j in range(kv_r.shape[1]):
            rows = _group_weights(kept, leaving, target, mask, b, j)
            if len(rows) == 1:   # untouched: unchanged
                assert not touched[b, j] and torch.equal(kv_r[b, j], kept[0][b, j])
                continue
            W = sum(w for _, w in rows)                                                  # [H]
            # mass, exact per head: p_hr exp(l_h(kv_r)) = W_h, and the stored prediction agrees
            mass = (ln_p_r[b, :, j] + _logits(Q[b:b + 1], kv_r[b:b + 1, j:j + 1], scale)[0, :, 0]).exp()
            torch.testing.assert_close(mass, W, rtol=1e-10, atol=0)
            torch.testing.assert_close((ln_p_r[b, :, j] + ln_s_r[b, :, j]).exp(), W, rtol=1e-10, atol=0)
            # value: independent least squares (stacked sqrt(omega_h) W_v_h rows, lstsq) with the
            # same tiny ridge toward cmix; omega_h = (W_h / Z_h)^2
            cbar = torch.stack([sum(w[h] * k[:C] for k, w in rows) / W[h] for h in range(H)])  # [H, C]
            omega = (W / ln_z[b].exp()) ** 2
            omega = omega / omega.max()
            kbar = torch.stack([sum(w[h] * k for k, w in rows) / W[h] for h in range(H)])
            mix = (omega[:, None] * kbar).sum(0) / omega.sum()
            gram = sum(omega[h] * w_v[h].T @ w_v[h] for h in range(H))
            lam = 1e-6 * gram.diagonal().mean()
            A = torch.cat([omega[h].sqrt() * w_v[h] for h in range(H)] + [lam.sqrt() * torch.eye(C, dtype=torch.float64)])
            y = torch.cat([omega[h].sqrt() * w_v[h] @ cbar[h] for h in range(H)] + [lam.sqrt() * mix[:C]])
            c_ref = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
            torch.testing.assert_close(kv_r[b, j, :C], c_ref, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(kv_r[b, j, C:], mix[C:], rtol=1e-10, atol=1e-12)
            res = sum(omega[h] * (w_v[h] @ (c_ref - cbar[h])).square().sum() for h in range(H))
            res = res / sum(omega[h] * (w_v[h] @ cbar[h]).square().sum() for h in range(H))
            assert residual[b, j].item() == pytest.approx(res.item(), rel=1e-6)
            assert residual[b, j] > 1e-6  # H * DV > C and different head weightings: not exact


def test_kept_grams_and_chunked_solves_change_nothing():
    # a cache passes head_grams(w_v) computed once; the solve runs a chunk of targets at a time
    kept, leaving, target, mask, Q, ln_z, w_v, scale = _scene(3, n_kept=7, n_leave=9)
    ref = kl.merge_latent(kept, leaving, target, mask, Q, ln_z, w_v, scale)
    given = kl.merge_latent(kept, leaving, target, mask, Q, ln_z, w_v, scale, gram=kl.head_grams(w_v, Q.dtype))
    for a, b in zip(ref[0], given[0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    omega = torch.rand(2, H, 7, generator=g, dtype=torch.float64)
    grams = kl.head_grams(torch.randn(H, DV, C, generator=g, dtype=torch.float64), torch.float64)
    rhs, prior = torch.randn(2, 7, C, generator=g, dtype=torch.float64), torch.randn(2, 7, C, generator=g, dtype=torch.float64)
    whole = kl.solve_targets(omega, grams, rhs, prior)
    chunked = kl.solve_targets(omega, grams, rhs, prior, max_elems=2 * 3 * C * C)   # chunks of 3, 3, 1 targets
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    # and each is the solve of its own system (slow loop)
    for b in range(2):
        for n in range(7):
            A = sum(omega[b, h, n] * grams[h] for h in range(H))
            lam = 1e-6 * A.diagonal().mean() + 1e-30
            x = torch.linalg.solve(A + lam * torch.eye(C, dtype=torch.float64), rhs[b, n] + lam * prior[b, n])
            torch.testing.assert_close(whole[b, n], x, rtol=1e-10, atol=1e-12)


def test_convex_latent_merge_loses_the_mass():
    kept, leaving, target, mask, Q, ln_z, w_v, scale = _scene(1)
    (kv_r, ln_p_r, _), touched, _ = kl.merge_latent(kept, leaving, target, mask, Q, ln_z, w_v, scale, "convex")
    b, j = touched.nonzero()[0].tolist()
    W = sum(w for _, w in _group_weights(kept, leaving, target, mask, b, j))
    mass = (ln_p_r[b, :, j] + _logits(Q[b:b + 1], kv_r[b:b + 1, j:j + 1], scale)[0, :, 0]).exp()
    assert ((mass - W).abs() / W).max() > 1e-3


@pytest.fixture(scope="module")
def tiny64():
    torch.manual_seed(0)
    model = build_model(get_args("tiny", max_seq_len=96, n_layers=2), seed=0).double().eval()
    # sharper attention than at init, so that entries differ in weight and merges matter
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.wkv_a.weight.mul_(6.0)
            (layer.attn.wq.weight if hasattr(layer.attn, "wq") else layer.attn.wq_b.weight).mul_(6.0)
    tokens = torch.randint(0, model.args.vocab_size, (2, 72), generator=torch.Generator().manual_seed(1))
    return model, tokens


def _run(model, tokens, P, cfg, track=False):
    caches = kl.make_caches(model, tokens.shape[0], P, cfg, tokens.shape[1] - P, track=track)
    with torch.no_grad():
        out = [model(tokens[:, :P], torch.arange(P), caches)]
        for t in range(P, tokens.shape[1]):
            out.append(model(tokens[:, t:t + 1], torch.tensor([t]), caches))
    return torch.cat(out, 1), caches


def test_full_latent_and_uncompressed_steps_match_the_forward(tiny64):
    model, tokens = tiny64
    with torch.no_grad():
        ref = model(tokens)
    full, _ = _run(model, tokens, 48, keepkv.KVConfig(policy="full"))
    torch.testing.assert_close(full, ref, rtol=1e-9, atol=1e-9)
    # budget 1: the prefill keeps the whole prompt, so the first decode step (the new token enters,
    # one entry leaves, alpha = 0 KeepKV merges it exactly) still equals the full cache, up to the
    # merge's value residual; the prefill itself is exact for every policy
    for policy in ("keepkv", "h2o", "streaming"):
        out, _ = _run(model, tokens[:, :49], 48, keepkv.KVConfig(policy=policy, budget=1.0, alpha=0.0))
        torch.testing.assert_close(out[:, :48], ref[:, :48], rtol=1e-9, atol=1e-9)


def _mass_per_step(model, tokens, P, cfg):
    """Per decode step and head: ln of the total attention weight of the scoring query before the
    removal and after it (the two passes of LatentKeepKVCache._decode), layer 0."""
    seen = []
    orig = kl.attend_latent

    def spy(Q, kv, log_votes, scale, n_latent, return_logits=False):
        seen.append(torch.logsumexp(_logits(Q, kv.double(), scale) + log_votes, -1))   # [B, H]
        return orig(Q, kv, log_votes, scale, n_latent, return_logits)

    kl.attend_latent = spy
    try:
        _, caches = _run(model, tokens, P, cfg, track=True)
    finally:
        kl.attend_latent = orig
    per_layer = len(model.layers) * 2
    steps = [(seen[i], seen[i + 1]) for i in range(0, len(seen), per_layer)]
    return steps, caches


def test_latent_keepkv_step_keeps_every_heads_mass_eviction_does_not(tiny64):
    model, tokens = tiny64
    P = 48
    cfg = dict(budget=0.25, alpha=0.0, threshold=-1.0)          # threshold -1: every leaving entry merges
    steps, caches = _mass_per_step(model, tokens, P, keepkv.KVConfig(policy="keepkv", **cfg))
    assert kl.cache_stats(caches)["merges"] > 0
    for before, after in steps:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    steps, _ = _mass_per_step(model, tokens, P, keepkv.KVConfig(policy="keepkv", **{**cfg, "threshold": 2.0}))
    assert max((b - a).abs().max().item() for b, a in steps) > 1e-3     # evicted: mass lost
    steps, _ = _mass_per_step(model, tokens, P, keepkv.KVConfig(policy="convex", **cfg))
    assert max((b - a).abs().max().item() for b, a in steps) > 1e-3


def test_latent_merge_of_the_dominant_entry_perturbs_least(tiny64):
    """The entry with the largest logit (over heads) leaves into its most similar neighbour: the
    output of every head moves least under the ZIP-style latent merge, more under a convex merge,
    most under eviction."""
    model, tokens = tiny64
    attn = model.layers[1].attn
    with torch.no_grad():
        h = model.embed(tokens[:, :60])
        cos, sin = model.rope_cos[:60], model.rope_sin[:60]
        h = model.layers[0](h, cos, sin)
        x = model.layers[1].attn_norm(h)
        q_nope, q_rope = attn.query(x, cos, sin)
        c, k_rope = attn.latent(x, cos, sin)
    w = attn.wkv_b.weight.view(attn.n_heads, attn.nope + attn.v_dim, attn.kv_lora_rank)
    w_kc, w_v = w[:, :attn.nope].detach(), w[:, attn.nope:].detach()
    Q = kl.absorbed_query(q_nope[:, -1], q_rope[:, -1], w_kc)                     # [B, H, D]
    kv = torch.cat([c, k_rope], -1)                                               # [B, T, D]
    scale = attn.softmax_scale
    ln_s, ln_p = _logits(Q, kv, scale), torch.zeros(2, attn.n_heads, kv.shape[1], dtype=torch.float64)
    ln_z = torch.logsumexp(ln_s, -1)
    lead = ln_s.amax(1).argmax(-1, keepdim=True)                                  # [B, 1]
    others = torch.ones(2, kv.shape[1], dtype=torch.bool).scatter(1, lead, False)
    sim = torch.nn.functional.normalize(kv, dim=-1)
    sims = torch.einsum("bd,bnd->bn", sim.gather(1, lead[..., None].expand(-1, 1, kv.shape[-1]))[:, 0], sim)
    target = sims.masked_fill(~others, -2).argmax(-1, keepdim=True)
    full = kl.attend_latent(Q, kv, ln_p, scale, attn.kv_lora_rank)

    def after(mode):
        kept, leaving = kl.rows_at(kv, ln_p, ln_s, idx=target), kl.rows_at(kv, ln_p, ln_s, idx=lead)
        votes = ln_p.clone()
        kv2 = kv.clone()
        if mode != "evict":
            new, _, _ = kl.merge_latent(kept, leaving, torch.zeros_like(target), torch.ones_like(target, dtype=torch.bool),
                                        Q, ln_z, w_v, scale, mode)
            kv2.scatter_(1, target[..., None].expand(-1, 1, kv.shape[-1]), new[0])
            votes.scatter_(2, target[:, None].expand(-1, attn.n_heads, 1), new[1])
        votes.scatter_(2, lead[:, None].expand(-1, attn.n_heads, 1), -math.inf)
        o = kl.attend_latent(Q, kv2, votes, scale, attn.kv_lora_rank)
        return torch.einsum("bhc,hvc->bhv", o - full, w_v).square().sum((1, 2))   # sum_h |do_h|^2

    with torch.no_grad():
        size = torch.einsum("bhc,hvc->bhv", full, w_v).square().sum((1, 2))
        zip_, convex, evict = after("zip") / size, after("convex") / size, after("evict") / size
    # with the mass exact, this total is what merge_latent's least squares minimises; per row:
    assert (evict > 1e-3).all()                                   # the dominant entry matters
    assert (zip_ < convex).all() and (zip_ < 0.2 * evict).all()


def test_bytes_and_break_even():
    k2 = get_args("kimi-k2")
    be = kl.break_even(k2)
    # a KeepKV slot: per head ln p, the selection's score and ZIP's ln sigma (fp32), an int32 position
    assert be["per-head"] == pytest.approx(1152 / (40960 + 64 * 16), rel=1e-12)   # ~2.7%, as REFERENCE 3b
    assert be["latent"] == pytest.approx(1152 / (1152 + 768 + 4), rel=1e-12)
    model = build_model(get_args("tiny", n_layers=2), seed=0)
    cfg = keepkv.KVConfig(budget=0.5)
    cache = kl.make_caches(model, 3, 40, cfg)[0]
    a = model.args
    n = keepkv.capacity(40, cfg) + 1
    assert cache.nbytes() == 3 * n * ((a.kv_lora_rank + a.qk_rope_head_dim) * 4 + 3 * a.n_heads * 4 + 4)
    h2o = kl.make_caches(model, 3, 40, keepkv.KVConfig(policy="h2o", budget=0.5))[0]   # no prediction to keep
    assert h2o.nbytes() == 3 * n * ((a.kv_lora_rank + a.qk_rope_head_dim) * 4 + 2 * a.n_heads * 4 + 4)
    assert kl.full_latent_bytes(model, 3, 40) == 2 * 3 * 40 * 80 * 4


@pytest.mark.parametrize("select", kvselect.SELECTIONS)
def test_latent_merging_off_is_its_selection_exactly(tiny64, select):
    """On the latent cache too, keepkv and convex with merge_at = "none" give their selection's
    logits bit for bit; with merging on they differ."""
    model, tokens = tiny64
    base = dict(budget=0.25, snap_window=8, threshold=-1.0)
    ref, _ = _run(model, tokens, 48, keepkv.KVConfig(policy=select, **base))
    for policy in keepkv.MERGING:
        off, _ = _run(model, tokens, 48, keepkv.KVConfig(policy=policy, select=select, merge_at="none", **base))
        assert torch.equal(off, ref), policy
        on, caches = _run(model, tokens, 48, keepkv.KVConfig(policy=policy, select=select, **base), track=True)
        assert kl.cache_stats(caches)["merges"] > 0 and (on[:, 48:] - ref[:, 48:]).abs().max() > 1e-6


@pytest.mark.parametrize("case", [dict(policy=p) for p in ("keepkv", "convex", "h2o", "snapkv", "streaming")] +
                         [dict(policy="keepkv", merge_at="both", votes=False)], ids=str)
def test_latent_budget_invariants(tiny64, case):
    """Every latent policy at one budget holds the same Sk live entries after the prefill and after
    each decode step, and its recent part is all there."""
    model, tokens = tiny64
    P, cfg = 48, keepkv.KVConfig(budget=0.25, snap_window=8, threshold=0.0, **case)
    Sk = keepkv.capacity(P, cfg)
    recent = int(kvselect.recent_count(cfg, Sk))
    caches = kl.make_caches(model, 2, P, cfg, tokens.shape[1] - P)
    with torch.no_grad():
        model(tokens[:, :P], torch.arange(P), caches)
        for t in range(P - 1, tokens.shape[1]):
            if t >= P:
                model(tokens[:, t:t + 1], torch.tensor([t]), caches)
            for c in caches:
                assert (c.live().sum(-1) == Sk).all()
                pos = c.slots.pos.masked_fill(~c.live(), -1)
                for must in range(t + 1 - recent, t + 1):
                    assert (pos == must).any(-1).all(), f"position {must} missing at step {t}"



def test_shared_slots_write_read_and_free_one_slot_in_every_head():
    """keepkv.CacheSlots(shared=True), the latent cache's storage: one entry [B, S, *] per slot,
    votes and scores per head [B, H, S]; a slot index [B, M] addresses that slot in every head."""
    B, S, width = 2, 5, 3
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    slots = keepkv.CacheSlots(B, H, S, {"kv": width}, torch.float64, pred=True, shared=True)
    assert slots.kv.shape == (B, S, width) and slots.pos.shape == (B, S) and slots.log_votes.shape == (B, H, S)
    assert slots.nbytes() == B * S * (width * 8 + 3 * H * 8 + 4)
    for t in range(S):   # each token takes the first free slot, with one vote in every head
        kv = r(B, width)
        assert (slots.write_token((kv,), torch.tensor(t)) == t).all()
        assert torch.equal(slots.kv[:, t], kv) and (slots.pos[:, t] == t).all() and (slots.log_votes[..., t] == 0).all()
    assert slots.live().shape == (B, S) and slots.live().all()
    slots.log_score.copy_(r(B, H, S))
    slots.log_pred.copy_(r(B, H, S))
    idx, names = torch.tensor([[3], [1]]), (*slots.merged, "log_score")             # idx [B, 1]
    rows = slots.rows(idx, names)
    assert [tuple(x.shape) for x in rows] == [(B, 1, width), (B, H, 1), (B, H, 1), (B, H, 1)]
    assert torch.equal(rows[0][:, 0], slots.kv[[0, 1], [3, 1]])
    assert torch.equal(rows[3][0, :, 0], slots.log_score[0, :, 3]) and torch.equal(rows[3][1, :, 0], slots.log_score[1, :, 1])
    before = [getattr(slots, n).clone() for n in names]
    slots.put_rows(idx, [x + 1 for x in rows], names)
    for name, x0 in zip(names, before):
        x1 = getattr(slots, name)
        changed = x1 != x0 if name != "kv" else (x1 != x0).all(-1)[:, None]        # [B, H or 1, S]
        want = torch.zeros_like(changed)
        want[0, :, 3] = want[1, :, 1] = True
        assert torch.equal(changed, want), name
    slots.free(idx, torch.tensor([[True], [False]]))                                 # row 1's slot stays
    assert slots.live()[0].tolist() == [True, True, True, False, True] and slots.live()[1].all()
    assert (slots.log_votes[0, :, 3] == -math.inf).all() and (slots.log_votes[1] > -math.inf).all()
