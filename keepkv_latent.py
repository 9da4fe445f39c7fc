"""KeepKV on the absorbed MLA latent cache: the cache a K2 model actually serves from.

An MLA model decodes from its latent cache (path 4 of model.py): per token and layer it stores the
normalised latent c (C numbers) and the shared rotary key k_rope (Dr), 576 numbers on Kimi K2,
where the per-head cache of keepkv.py holds H(Dn+Dr+Dv) = 20,480. Per-head KeepKV at a 10% budget
on K2 therefore holds ~3.6x the bytes of the UNCOMPRESSED latent cache. This file compresses the
latent cache itself, with the same policies and the same selection code as keepkv.py.

Absorbed attention is multi-query attention. Head h has the query Q_h = [W_kc_h^T q_nope_h | q_rope_h]
and every head scores the same key kv_i = [c_i | k_rope_i]:  l_hi = scale * Q_h.kv_i.  The value is
c_i itself, and head h outputs W_v_h (sum_i a_hi c_i) with a_h the softmax of l_h + ln p_h.

Merging entries i (a kept one and those that leave into it) into one entry r. For the query that
scores the merge, head h gives them weights w_hi = p_hi sigma_hi (sigma: ZIP's predicted score,
keepkv.py), total W_h, and the exact result needs
  mass:   p_hr exp(l_h(kv_r)) = W_h                          for every h (H equations),
  value:  W_v_h c_r = W_v_h cbar_h,  cbar_h = sum_i w_hi c_i / W_h   (H*Dv equations on C numbers).
One shared key cannot give every head its own tilted-mean logit, and one shared c_r cannot give
every head its own weighted mean once H*Dv > C (K2: 8,192 > 512). So:
1. Mass, exact: per-head votes. Each entry keeps ln p_h per head (H numbers). After choosing kv_r,
   set ln p_hr = ln W_h - l_h(kv_r), where l_h is the scoring query's own logit of the new key: head
   h then gives r exactly the weight its parts had, so every OTHER entry's attention weight, in every
   head, is unchanged. This needs the query itself (in the per-head cache the scores suffice), so
   the merge takes Q as an argument. With predicted scores (alpha > 0) W_h is a predicted mass, and
   the query's raw logit does not match it: the stored prediction is ln sigma_hr = lbar_h +
   l_h(kv_r) - l_h(kbar_h) (the parts' tilted-mean ln sigma, plus the merge's own effect on this
   query's logit; l_h(kbar_h) is the tilted mean of its logits, l_h being linear in kv) and
   ln p_hr = ln W_h - ln sigma_hr. With alpha = 0, lbar_h = l_h(kbar_h) and this is the exact form
   above. (The raw logit alone would pair a one-query logit with a many-query predicted mass, and
   the votes would absorb the mismatch and grow.)
2. Value, least squares. With the mass exact, head h's output moves by (W_h / Z_h) W_v_h (c_r - cbar_h)
   (Z_h: head h's total weight over the cache). c_r minimises the sum over heads of its squared
   norm: weights omega_h = (W_h / Z_h)^2 in  sum_h omega_h |W_v_h (c_r - cbar_h)|^2, i.e. the
   C x C solve (sum_h omega_h gram_h) c_r = sum_h omega_h gram_h cbar_h, gram_h = W_v_h^T W_v_h,
   plus a tiny ridge toward the omega-weighted mean cmix (W_v_h alone has rank Dv < C: the ridge
   fixes the directions no head reads). The residual is the whole perturbation of the merge for
   that query; `value_residual` reports it relative to the heads' outputs. k_rope_r is the
   omega-weighted mean of the heads' weighted means (any choice is exact for the mass; this one
   stays near the parts).
Exact for the scoring query with alpha = 0 (scores = its logits): every head's attention mass
over every entry. Approximated: the merged entry's value (the least-squares residual), and for later
queries both the logit of kv_r and the votes, which were tuned to the scoring query.
"convex" on this cache: the same selection and targets, kv_r = [cmix | k_rope_r], votes summed per
head (ln p_hr = ln sum p_hi): neither mass nor value is kept. Votes off (an ablation): ln p_hr = 0,
kv_r as above; one shared key cannot give H heads their masses, so the mass the votes held is lost.

Scores per head, decisions per token: the selection's attention sums and ZIP's prediction ln sigma
are kept per head, as in keepkv.py, but an entry is one latent, so who stays is decided once per
token from the mean over heads of the accumulated attention (kvselect.py's policies, the same code).
Merge targets: the kept entry whose shared key [c | k_rope] is most cosine-similar.

Storage per slot (keepkv.CacheSlots, shared by the heads): kv = [c | k_rope] (C + Dr, the model's
dtype), ln p and the selection's score per head (2H fp32), ZIP's ln sigma per head for the merging
policies (H more) and a position (int32). On K2 in bf16 a KeepKV slot is 1,152 + 768 + 4 bytes
against 1,152 for a full latent slot: the bookkeeping costs 67%, so compression pays below a
budget of ~0.6. The per-head KeepKV of keepkv.py pays only below ~0.028 on K2; `break_even`
computes both. Sizes: model.py's symbols (S slots, Sk entries kept, M leaving).
"""
import math

import torch
import torch.nn as nn

import keepkv
import kvselect
from keepkv import MERGING, NEG, KVConfig, merges_at
from model import LatentKVCache, absorbed_query, attend_absorbed_prompt


# ----------------------------------------------------------------------------- attention over the slots

def attend_latent(Q, kv, log_votes, scale, n_latent, return_logits=False):
    """One query per sequence and head over the shared slots: softmax_s(l_hs + ln p_hs) c_s.

    Q [B, H, C+Dr], kv [B, S, C+Dr] (the key [c | k_rope]; its first n_latent dims are also the
    value), log_votes [B, H, S] (-inf: empty slot). Returns the latent output [B, H, C] and, if
    asked, the logits l [B, H, S] without the votes."""
    cdt = Q.dtype
    logits = torch.einsum("bhd,bsd->bhs", Q, kv.to(cdt)) * scale
    log_w = logits + log_votes.to(cdt)
    m = log_w.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(log_w - m)
    out = torch.einsum("bhs,bsc->bhc", w, kv[..., :n_latent].to(cdt)) / w.sum(-1, keepdim=True).clamp_min(1e-300)
    return (out, logits) if return_logits else out


# ----------------------------------------------------------------------------- the latent merge

def merge_latent(kept, leaving, target, mask, Q, ln_z, w_v, scale, mode="zip", gram=None, votes=True):
    """Merge leaving entries into kept ones (several may share a target), as derived above.

    kept = (kv [B, Sk, C+Dr], ln p [B, H, Sk], ln sigma [B, H, Sk]); leaving: the same with M
    rows; target [B, M] indexes Sk; only rows with mask [B, M] merge. Q [B, H, C+Dr]: the scoring
    query; ln_z [B, H]: ln of each head's total predicted weight over the whole cache (omega's Z_h);
    w_v [H, Dv, C]. Returns the new kept rows, the targets touched [B, Sk] and the relative value
    residual [B, Sk] (sum_h omega_h |W_v_h (c_r - cbar_h)|^2 / sum_h omega_h |W_v_h cbar_h|^2).
    Everything runs relative to each (head, target) group's largest ln w, so exp never overflows.
    gram: head_grams(w_v), if the caller keeps it (a cache does: it depends on the weights only).
    votes=False: the merged entry's ln p is 0 in every head (an ablation: its mass is not kept).
    """
    kv, ln_p, ln_s = kept
    kv_in, ln_p_in, ln_s_in = leaving
    cdt = Q.dtype
    B, H, Sk = ln_p.shape
    n_lat = w_v.shape[-1]
    kvf, kvin, wv = kv.to(cdt), kv_in.to(cdt), w_v.to(cdt)
    lw = (ln_p + ln_s).to(cdt)                                                   # ln w, kept
    lw_in = (ln_p_in + ln_s_in).to(cdt).masked_fill(~mask[:, None], NEG)        # non-merging weigh 0
    tgt = target[:, None].expand(B, H, target.shape[1])
    m = lw.scatter_reduce(-1, tgt, lw_in, reduce="amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a, a_in = torch.exp(lw - m), torch.exp(lw_in - m.gather(-1, tgt))           # w / e^m per head
    A = a.scatter_add(-1, tgt, a_in)                                            # W_h / e^m
    idx = target[:, None, :, None].expand(B, H, target.shape[1], kv.shape[-1])
    kbar = (a[..., None] * kvf[:, None]).scatter_add(2, idx, a_in[..., None] * kvin[:, None]) / A[..., None]
    lnW = m + torch.log(A)                                                      # [B, H, Sk]
    ln_omega = 2 * (lnW - ln_z[..., None].to(cdt))
    omega = torch.exp(ln_omega - ln_omega.amax(1, keepdim=True))                # [B, H, Sk], max 1
    mix = (omega[..., None] * kbar).sum(1) / omega.sum(1)[..., None]            # [B, Sk, C+Dr]
    cbar = kbar[..., :n_lat]
    if mode == "zip":   # least squares in the heads' W_v metrics, ridge toward cmix
        grams = head_grams(w_v, cdt) if gram is None else gram.to(cdt)             # [H, C, C]
        rhs = torch.einsum("bhn,hvc,bhnv->bnc", omega, wv, torch.einsum("hvc,bhnc->bhnv", wv, cbar))
        c_r = solve_targets(omega, grams, rhs, mix[..., :n_lat])
        kv_r = torch.cat([c_r, mix[..., n_lat:]], -1)
        # the scoring query's logit of kv_r, less its tilted mean over the parts (l_h is linear in
        # kv, so that mean is l_h(kbar_h)): the merge's own effect on this query. Added to the
        # parts' predicted tilted mean lbar_h it is the merged entry's predicted score; with
        # alpha = 0 (scores = this query's logits) lbar_h = l_h(kbar_h) and ln sigma_r = l_h(kv_r)
        ls, ls_in = ln_s.to(cdt), ln_s_in.to(cdt).masked_fill(~mask[:, None], 0.0)
        lbar = (a * ls).scatter_add(-1, tgt, a_in * ls_in) / A
        shift = (torch.einsum("bhd,bnd->bhn", Q, kv_r) - torch.einsum("bhd,bhnd->bhn", Q, kbar)) * scale
        ln_s_new = lbar + shift
        ln_p_new = lnW - ln_s_new
    elif mode == "convex":
        kv_r = mix
        mp = ln_p.to(cdt).scatter_reduce(-1, tgt, ln_p_in.to(cdt).masked_fill(~mask[:, None], NEG),
                                         reduce="amax", include_self=True)
        P = torch.exp(ln_p.to(cdt) - mp).scatter_add(
            -1, tgt, torch.exp(ln_p_in.to(cdt).masked_fill(~mask[:, None], NEG) - mp.gather(-1, tgt)))
        ln_p_new = mp + torch.log(P)
        ln_s_new = torch.einsum("bhd,bnd->bhn", Q, kv_r) * scale       # the logit kv_r really has
    else:
        raise ValueError(f"unknown merge mode {mode!r}")
    if not votes:
        ln_p_new = torch.zeros_like(ln_p_new)
    diff = torch.einsum("hvc,bhnc->bhnv", wv, kv_r[:, None, :, :n_lat] - cbar)
    ref = torch.einsum("hvc,bhnc->bhnv", wv, cbar)
    residual = (omega * diff.square().sum(-1)).sum(1) / (omega * ref.square().sum(-1)).sum(1).clamp_min(1e-300)
    touched = torch.zeros(B, Sk, dtype=cdt, device=kv.device).scatter_add(1, target, mask.to(cdt)) > 0
    return ((torch.where(touched[..., None], kv_r, kvf).to(kv.dtype),
             torch.where(touched[:, None], ln_p_new, ln_p.to(cdt)).to(ln_p.dtype),
             torch.where(touched[:, None], ln_s_new, ln_s.to(cdt)).to(ln_s.dtype)),
            touched, torch.where(touched, residual, torch.zeros_like(residual)))


def head_grams(w_v, dtype) -> torch.Tensor:
    """gram_h = W_v_h^T W_v_h [H, C, C]: each head's metric on the latent. It depends on the weights
    only, so a cache computes it once: on K2 it is 2.1G multiply-adds per layer (H Dv C^2 = 64 x 128 x 512^2),
    more than the rest of a merge, and 64 x 512^2 numbers (64 MiB in fp32) per layer to keep."""
    wv = w_v.to(dtype)
    return torch.einsum("hvc,hvd->hcd", wv, wv)


def solve_targets(omega, grams, rhs, prior, max_elems: int = 1 << 24):
    """Each target's c_r: (sum_h omega_h gram_h + ridge I) c_r = rhs + ridge * prior, one C x C
    system per target (omega [B, H, Sk], grams [H, C, C], rhs and prior [B, Sk, C]). The systems
    are built and solved a chunk of targets at a time, at most max_elems numbers of matrix each: a
    prefill that keeps 10,000 entries of K2's 512-number latent would otherwise hold 10,000 x 512^2
    numbers."""
    B, _, n = omega.shape
    C = grams.shape[-1]
    eye = torch.eye(C, dtype=grams.dtype, device=grams.device)
    step = max(1, max_elems // (B * C * C))
    out = []
    for s in range(0, n, step):
        system = torch.einsum("bhn,hcd->bncd", omega[..., s:s + step], grams)           # [B, chunk, C, C]
        ridge = 1e-6 * system.diagonal(dim1=-2, dim2=-1).mean(-1) + 1e-30               # [B, chunk]
        out.append(torch.linalg.solve(system + ridge[..., None, None] * eye,
                                      rhs[:, s:s + step] + ridge[..., None] * prior[:, s:s + step]))
    return torch.cat(out, 1)


# ----------------------------------------------------------------------------- decisions per token

def token_priority(ln_s):
    """The selection's score per token [B, S] from per-head attention sums [B, H, S]: ln of their
    mean over heads (streaming ranks by position instead: kvselect.keep_priority)."""
    return torch.logsumexp(ln_s, 1) - math.log(ln_s.shape[1])


def rows_at(kv, *per_head, idx):
    """kv [B, S, *] and each per-head [B, H, S] at token slots idx [B, M]: ([B, M, *], [B, H, M], ..)."""
    return (kv.gather(1, idx[..., None].expand(*idx.shape, kv.shape[-1])),
            *(x.gather(2, idx[:, None].expand(-1, x.shape[1], -1)) for x in per_head))


# ----------------------------------------------------------------------------- the cache

class LatentKeepKVCache(nn.Module):
    """Fixed-size latent cache: a keepkv.py policy run over keepkv.CacheSlots in the shared layout
    (S slots of kv = [c | k_rope] [B, S, C+Dr] and positions [B, S], per-head ln p and ln sigma
    [B, H, S]); this class decides, the slots store. Implements model.LatentKVCache's protocol,
    `attend_latent(q_nope, q_rope, c, k_rope, w_kc, w_v, input_pos, scale)`: the first call is the
    prefill, then one token per call.
    Like keepkv.KeepKVCache, each decode step writes the new token, attends over every slot (its
    logits update the scores), then lets one entry leave (merged or evicted) when over capacity."""
    absorbed = True

    def __init__(self, batch, prompt_len, n_heads, kv_lora_rank, rope_dim, cfg: KVConfig,
                 max_new_tokens=0, dtype=torch.float32, device=None, track=False):
        super().__init__()
        if cfg.policy == "full":
            raise ValueError("policy 'full' on the latent cache is model.LatentKVCache; use make_caches")
        self.cfg, self.track, self.n_latent, self.n_heads = cfg, track, kv_lora_rank, n_heads
        self.kept = keepkv.capacity(prompt_len, cfg)                     # entries the prefill keeps
        self.capacity = keepkv.capacity(prompt_len, cfg, max_new_tokens)  # most live at once
        # one slot more than the capacity: the new token's. Entries [c | k_rope] shared by the heads
        self.slots = keepkv.CacheSlots(batch, n_heads, self.capacity + 1, {"kv": kv_lora_rank + rope_dim},
                                       dtype, device, pred=cfg.policy in MERGING, shared=True)
        self.register_buffer("stats", keepkv.new_stats(device))   # fields: keepkv.STATS (track=True)
        self.prefilled = False
        self.gram = None  # head_grams(w_v), computed at the first merge (zip only)

    def grams(self, w_v, dtype):
        if self.gram is None or self.gram.dtype != dtype:
            self.gram = head_grams(w_v, dtype)
        return self.gram

    def reset(self):
        self.slots.reset()
        self.stats.zero_()
        self.prefilled = False

    def live(self) -> torch.Tensor:
        return self.slots.live()                                                   # [B, S]

    def nbytes(self) -> int:
        """Bytes held: keys/latents, per-head votes and scores, positions, of every slot."""
        return self.slots.nbytes()

    def attend_latent(self, q_nope, q_rope, c, k_rope, w_kc, w_v, input_pos, scale):
        Q = absorbed_query(q_nope, q_rope, w_kc)                                   # [B, T, H, C+Dr]
        kv = torch.cat([c, k_rope], -1)                                            # [B, T, C+Dr]
        o_lat = self.attend_shared(Q, kv, w_v, input_pos, scale)                   # [B, T, H, C]
        return torch.einsum("bthc,hvc->bthv", o_lat, w_v.to(o_lat.dtype))

    def attend_shared(self, Q, kv, w_v, input_pos, scale):
        """The cache's own protocol, for any cache whose entries are shared by several query heads:
        queries Q [B, T, H, *] over shared keys kv [B, T, *] whose first n_latent dims are the value;
        head h's output is read through w_v [H, Dv, n_latent] (the merge's metric). Returns the
        value-space outputs [B, T, H, n_latent]. MLA's absorbed path is one user; a GQA group (key
        [v | k], query [0 | q], w_v = I) is another (benchmarks/smollm2.py)."""
        if not self.prefilled:
            return self._prefill(Q, kv, w_v, input_pos, scale)
        if Q.shape[1] != 1:
            raise ValueError("after the prefill a KeepKV cache takes one token per call")
        return self._decode(Q[:, 0], kv[:, 0], w_v, input_pos[0], scale)[:, None]

    def compress_shared(self, Q, kv, w_v, input_pos, scale):
        """The prefill's compression without its attention output (see keepkv.KeepKVCache.compress)."""
        self._prefill(Q, kv, w_v, input_pos, scale, output=False)

    def _merge(self, kept, leaving, target, merge, Q, ln_z, w_v, scale):
        """merge_latent with this policy's mode and votes; rows are (kv, ln p, ln sigma, score), the
        last two per head: ZIP's prediction and the selection's score (summed over the parts)."""
        zip_ = self.cfg.policy == "keepkv"
        mode, gram = ("zip", self.grams(w_v, Q.dtype)) if zip_ else ("convex", None)
        new, touched, res = merge_latent(kept[:3], leaving[:3], target, merge, Q, ln_z, w_v, scale, mode, gram,
                                         self.cfg.votes)
        H = kept[1].shape[1]
        at, mask = target[:, None].expand(-1, H, -1), merge[:, None].expand(-1, H, -1)
        return (*new, kvselect.merged_scores(kept[3], leaving[3], at, mask)), res

    def _select(self, score, pos, live, t, Sk=None):
        """kvselect's selection on one key group: the per-token score stands in for the heads'."""
        cfg = self.cfg
        if Sk is not None:
            return kvselect.split_prompt(cfg, score[:, None], pos[:, None], t, Sk)
        return kvselect.leaving_slot(cfg, score[:, None], pos[:, None], live[:, None], t, self.capacity)

    # --- prefill: exact causal attention over the prompt, then compress once ---------------------

    @torch.no_grad()
    def _prefill(self, Q, kv, w_v, input_pos, scale, output=True):
        cfg, Sk = self.cfg, self.kept
        self.reset()
        cdt = Q.dtype
        Qh, kvf = Q.transpose(1, 2), kv.to(cdt)                                    # [B, H, T, *], [B, T, *]
        B, H, T, _ = Qh.shape
        out = attend_absorbed_prompt(Q, kvf, scale, self.n_latent) if output else None   # [B, T, H, C], exact
        kvh = kvf[:, None].expand(B, H, T, -1)
        score = kvselect.prefill_scores(cfg, Qh, kvh, scale)
        ln_p = torch.zeros_like(score)
        pred = keepkv.ema_window_scores(Qh, kvh, scale, cfg.alpha, cfg.obs_window) if cfg.policy in MERGING \
            else torch.zeros_like(score)
        pos = input_pos.to(torch.int32).expand(B, T)
        rows = (kvf, ln_p, pred, score)
        if T > Sk:
            keep, leave = self._select(token_priority(score), pos, None, int(input_pos[-1]), Sk)
            keep, leave = keep[:, 0], leave[:, 0]                                  # [B, Sk], [B, T-Sk]
            kept = rows_at(*rows, idx=keep)
            if merges_at(cfg, "prefill"):
                leaving = rows_at(*rows, idx=leave)
                target, merge = keepkv.merge_targets(cfg, leaving[0][:, None], kept[0][:, None])
                ln_z = torch.logsumexp(ln_p + pred, -1)
                kept, _ = self._merge(kept, leaving, target[:, 0], merge[:, 0], Qh[:, :, -1], ln_z, w_v, scale)
                if self.track:
                    keepkv.count_(self.stats, prefill_leaving=merge.numel(), prefill_merged=merge.sum())
            rows = kept
            pos = pos.gather(1, keep)
        kv, ln_p, pred, score = rows
        self.slots.write_prefix(kv=kv, log_votes=ln_p, log_score=score, pos=pos,
                                log_pred=pred if cfg.policy in MERGING else None)
        self.prefilled = True
        return out

    # --- decode: one token in and attended over, at most one entry out ---------------------------

    def _merge_one(self, leave, over, live, Q, w_v, scale):
        """Merge the leaving slot [B, 1] into the most similar other live slot, where the cache is
        over capacity and the keys are similar enough. Returns the merge mask and value residual."""
        s, names = self.slots, (*self.slots.merged, "log_score")        # kv, ln p, ln sigma, score
        leaving = s.rows(leave, names)
        others = live & (torch.arange(s.n_slots, device=live.device) != leave)
        target, similar = keepkv.merge_targets(self.cfg, leaving[0][:, None], s.kv[:, None], others[:, None])
        target, merged = target[:, 0], over & similar[:, 0]                             # [B, 1]
        ln_z = torch.logsumexp((s.log_votes + s.log_pred).masked_fill(~live[:, None], NEG), -1)
        kept = s.rows(target, names)
        new, res = self._merge(kept, leaving, torch.zeros_like(target), merged, Q, ln_z, w_v, scale)
        s.put_rows(target, new, names)                  # unchanged where nothing merged
        return merged, res

    @torch.no_grad()
    def _decode(self, Q, kv, w_v, t, scale):
        """Q [B, H, C+Dr], kv [B, C+Dr] (its entry), t: its position (0-d tensor) -> [B, H, C]."""
        cfg, s, n_lat = self.cfg, self.slots, self.n_latent
        slot = s.write_token((kv,), t)                                                    # [B, 1]
        o_before, logits = attend_latent(Q, s.kv, s.log_votes, scale, n_lat, True)
        keepkv.observe_(cfg, s, logits, (torch.arange(s.n_slots, device=Q.device) == slot)[:, None])
        live = s.live()
        over = live.sum(-1, keepdim=True) > self.capacity                               # [B, 1]
        leave = self._select(token_priority(s.log_score), s.pos, live, t)[:, 0]         # [B, 1]
        merged = torch.zeros_like(over)
        res = torch.zeros(over.shape, dtype=torch.float64, device=Q.device)
        if merges_at(cfg, "decode"):
            merged, res = self._merge_one(leave, over, live, Q, w_v, scale)
        s.free(leave, over)                             # merged or evicted, the slot is free again
        out = attend_latent(Q, s.kv, s.log_votes, scale, n_lat) if cfg.reattend or self.track else None
        if self.track:  # how much did this step's removal move each head's output (after W_v)?
            o0 = torch.einsum("bhc,hvc->bhv", o_before.double(), w_v.double())
            o1 = torch.einsum("bhc,hvc->bhv", out.double(), w_v.double())
            rel = (o1 - o0).norm(dim=-1) / o0.norm(dim=-1).clamp_min(1e-30)                # [B, H]
            H = self.n_heads           # removals and merges counted per head, as keepkv.py's
            keepkv.count_(self.stats, steps=1, removals=over.sum() * H, merges=merged.sum() * H,
                          perturbation_sum=(rel * over).sum(), perturbation_merged_sum=(rel * merged).sum(),
                          value_residual_sum=res.double().sum())
        return out if cfg.reattend else o_before


# ----------------------------------------------------------------------------- helpers

def make_caches(model, batch: int, prompt_len: int, cfg: KVConfig, max_new_tokens: int = 0,
                dtype=None, track: bool = False):
    """One latent cache per layer: model.LatentKVCache for "full", else a LatentKeepKVCache."""
    a, dev = model.args, model.embed.weight.device
    dtype = dtype or model.embed.weight.dtype
    if cfg.policy == "full":
        return [LatentKVCache(batch, prompt_len + max_new_tokens, a.kv_lora_rank, a.qk_rope_head_dim, dtype, dev)
                for _ in model.layers]
    return [LatentKeepKVCache(batch, prompt_len, a.n_heads, a.kv_lora_rank, a.qk_rope_head_dim, cfg,
                              max_new_tokens, dtype, dev, track) for _ in model.layers]


def full_latent_bytes(model, batch: int, n_tokens: int, dtype=None) -> int:
    """What model.LatentKVCache (c and k_rope, nothing else) takes for n_tokens."""
    a = model.args
    item = (dtype or model.embed.weight.dtype).itemsize
    return a.n_layers * batch * n_tokens * (a.kv_lora_rank + a.qk_rope_head_dim) * item


def slot_bytes(args, cache: str, dtype_bytes: int = 2, merging: bool = True) -> dict:
    """Bytes per token and layer: the full cache and a compressed slot (bookkeeping included: per
    head ln p and the selection's score, fp32, plus ZIP's ln sigma when merging; int32 positions)."""
    meta = (3 if merging else 2) * args.n_heads * 4
    if cache == "latent":
        full = (args.kv_lora_rank + args.qk_rope_head_dim) * dtype_bytes
        return {"full": full, "slot": full + meta + 4}
    full = args.n_heads * (args.qk_head_dim + args.v_head_dim) * dtype_bytes
    return {"full": full, "slot": full + meta + args.n_heads * 4}


def break_even(args, dtype_bytes: int = 2) -> dict:
    """The budget below which a compressed cache holds fewer bytes than the FULL LATENT cache."""
    lat, ph = slot_bytes(args, "latent", dtype_bytes), slot_bytes(args, "per-head", dtype_bytes)
    return {"latent": lat["full"] / lat["slot"], "per-head": lat["full"] / ph["slot"]}


def cache_stats(caches) -> dict:
    """keepkv.cache_stats over latent caches made with track=True, plus the mean relative value
    residual of the decode merges (merge_latent's criterion at its minimum)."""
    out = keepkv.cache_stats(caches)
    s = keepkv.stat_totals(caches)
    merges = s["merges"] / caches[0].n_heads               # counted per head; one residual per merge
    out["value_residual"] = s["value_residual_sum"] / merges if merges else 0.0
    return out
