"""KeepKV: a KV cache that merges what its selection drops, for the per-head (naive) MLA cache.

A compressed cache keeps Sk entries per head. Which entries leave is an eviction policy's choice
(kvselect.py: H2O, SnapKV, StreamingLLM). Evicting an entry loses its share of the softmax; a
plain average into a similar entry still changes the attention output. KeepKV (arXiv 2504.09936)
merges it so that the output, for the query the merge is tuned to, does not change at all.

1. Electoral votes. Each entry carries a vote count p (1 for a new token) and attention over the
   cache is  o = sum_i p_i s_i v_i / sum_i p_i s_i  with  s_i = exp(q.k_i * scale),  i.e. a softmax
   over  logit_i + ln p_i.  An entry with p = 3 acts exactly like three copies of itself. We store
   ln p (`log_votes`), so the votes are an additive bias on the logits (-inf: an empty slot).
2. ZIP merging. Merge entries i (weights w_i = p_i s_i) into one entry r with
       v_r = sum w_i v_i / sum w_i,   p_r = sum p_i,
       k_r = kbar * L / lbar,   kbar = sum w_i k_i / sum w_i,   lbar = sum w_i ln s_i / sum w_i,
   where L = ln(sum w_i / sum p_i). Logits are linear in k, so q.k_r*scale = (L / lbar) lbar = L,
   hence p_r s_r = sum w_i and p_r s_r v_r = sum w_i v_i: numerator and denominator both stay.
   Computed relative to the largest ln w_i, so exp never sees a large number. When lbar is near 0
   (0/0) or L / lbar would flip or blow up the key, a guarded form keeps k_r = kbar and moves the
   difference into the vote, ln p_r = ln sum p_i + L - lbar: also exact. A convex merge (k_r = kbar
   with votes, the authors' released code) gets the logit lbar >= L (ln of a mean <= the tilted
   mean), so it draws more attention than its parts. Votes off (`votes=False`, an ablation): p_r
   stays 1 and the key alone carries the mass, L = ln sum w_i (exact on the main path only).
3. Predicting s. ZIP is exact only for the query whose scores it used, so a merge uses a predicted
   score sigma (the paper's S): an EMA per entry, sigma_t = alpha sigma_{t-1} + (1 - alpha) s_t,
   kept as ln sigma (`log_pred`, via logaddexp), seeded at the end of prefill by the last
   `obs_window` prompt queries. Each entry starts at its first observed score (no 1/(1 - alpha^t)
   correction: the weights still sum to 1 and no per-entry step count is stored). alpha = 0
   predicts "the current query", and only then is a merge exact. The prediction feeds the merge
   only: it decides nothing about who stays.
4. Selection and merging are separate choices. "keepkv" = the selection `select` + ZIP merges of
   what it drops; "convex" = the same + convex merges; "h2o", "snapkv", "streaming" = a selection
   alone; "full" = no compression. A leaving entry merges into the kept entry whose key is the most
   cosine-similar if that similarity exceeds `threshold` (0.8, as in the paper), else it is evicted;
   several may share a target (the formulas are n-way). `merge_at` says when: at the prefill's
   compression, at decode steps, both, or never ("none": keepkv IS its selection, bit for bit).
   Defaults: select = "h2o", the paper's H2O ablation setting (PyramidInfer's per-layer budgets,
   its main one, are not built); merge_at = "both", as the paper merges at the prefill too: on the
   SmolLM2 testbed (RESULTS.md) it beat decode-only merging at every budget (vs H2O alone: -0.20
   nats/token at b = 0.02 against -0.13, -0.08 at 0.1 against -0.01); recent = 0.5, H2O's own
   split; alpha = 0.8 (alpha = 0 measured within noise of it).

Budget = fraction of the prompt KEPT: Sk = max(ceil(budget * prompt), n_sink + window), the same
Sk for every policy but "full". Compression runs once at the end of prefill, then once per decoded
token: the new token takes the one free slot (S = Sk + 1 slots), the query attends over all S (its
logits update the scores), and one entry leaves (merged or evicted). One pass per step; with
`reattend=True` the query attends again after the removal (alpha = 0: a merged step then returns
exactly the S entries' output, which tests ZIP). Shapes are static and nothing syncs with the
host: the decode step compiles.

Seams: attention over the cache, the ZIP merge, the prediction (ln sigma), where a leaving entry
goes, storage (`CacheSlots`, which knows no policy) and `KeepKVCache`, which runs a policy over its
slots. All but the attention work on Hk key groups. This cache holds the per-head keys and values
of the naive MLA path (Hk = H), where a merge is exact per head; keepkv_latent.py runs the same
policies on the latent cache a model serves from (C+Dr numbers per entry, 35.6x fewer on K2).

Shapes use model.py's symbols: B batch, H heads, Hk key groups (H here), T prompt tokens, Tw
observing queries, S slots, Sk kept entries (S = Sk + 1; prompt + new for "full"), M leaving
entries, Dqk / Dv key / value widths, `*` either; `..` stands for leading dimensions (B, Hk).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import decode_attention_auto
from kvselect import NEG, SELECTIONS, accumulate_, leaving_slot, merged_scores, prefill_scores, split_prompt

POLICIES = ("keepkv", "convex", "h2o", "snapkv", "streaming", "full")
MERGING = ("keepkv", "convex")
GROWING = ("full",)   # nothing leaves after the prefill: each new token takes a new slot
MERGE_AT = ("decode", "prefill", "both", "none")


@dataclass
class KVConfig:
    policy: str = "keepkv"
    budget: float = 0.1        # fraction of the prompt kept (capacity, at least n_sink + window)
    select: str = "h2o"        # keepkv, convex: the selection whose drops they merge (kvselect.py)
    merge_at: str = "both"     # keepkv, convex: merge at the prefill and at decode steps (or one, or none)
    votes: bool = True         # merged entries carry votes (False: p stays 1; an ablation)
    recent: float = 0.5        # h2o selection: share of Sk held by the most recent tokens (H2O: 0.5)
    n_sink: int = 4            # streaming: first tokens always kept (attention sinks)
    window: int = 8            # the smallest cache holds n_sink + window entries
    alpha: float = 0.8         # EMA of ZIP's predicted score; 0 = the current query only
    obs_window: int = 16       # prompt queries that seed the EMA
    threshold: float = 0.8     # cosine similarity above which a leaving entry merges (the paper's)
    snap_window: int = 32      # SnapKV: the last prompt queries that vote, all kept (its default)
    pool: int = 5              # SnapKV average-pooling kernel over keys (its default)
    zip_eps: float = 1e-3      # |lbar| below this: guarded fall-back instead of the key rescale
    gamma_max: float = 16.0    # ... and also when the key rescale L/lbar leaves [1/g, g]
    reattend: bool = False     # decode: attend again after the removal (else: before it, once)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown KV policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"unknown KV selection {self.select!r}; choose one of {', '.join(SELECTIONS)}")
        if self.merge_at not in MERGE_AT:
            raise ValueError(f"unknown merge_at {self.merge_at!r}; choose one of {', '.join(MERGE_AT)}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"kv budget must be in (0, 1] (the fraction of the prompt kept), "
                             f"got {self.budget}")
        if not 0 < self.recent <= 1:
            raise ValueError(f"recent must be in (0, 1] (the share of the capacity kept recent), got {self.recent}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if self.n_sink < 0 or min(self.window, self.obs_window, self.snap_window, self.pool) < 1:
            raise ValueError("need n_sink >= 0, window >= 1, obs_window >= 1, snap_window >= 1, pool >= 1")
        if self.pool % 2 == 0:  # an even kernel with padding pool // 2 yields T + 1 pooled scores
            raise ValueError(f"pool must be odd (a window centred on each key), got {self.pool}; "
                             f"use {self.pool + 1}")


def merges_at(cfg: KVConfig, phase: str) -> bool:
    """Does this config merge leaving entries at `phase` ("prefill" or "decode")?"""
    return cfg.policy in MERGING and cfg.merge_at in (phase, "both")


def capacity(prompt_len: int, cfg: KVConfig, max_new_tokens: int = 0) -> int:
    """The most entries a cache holds at once. Sk, kept at prefill and held while decoding, but
    Sk + max_new_tokens for the policies that only add after prefill (GROWING; "full": Sk = prompt)."""
    kept = math.ceil(cfg.budget * prompt_len - 1e-9)  # 0.1 * 250 is 25.000000000000004 in floats
    kept = prompt_len if cfg.policy == "full" else max(kept, cfg.n_sink + cfg.window)
    return kept + (max_new_tokens if cfg.policy in GROWING else 0)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _take(x, idx):
    """x [B, Hk, S(, *)] at idx [B, Hk, M] -> [B, Hk, M(, *)]."""
    if x.dim() == idx.dim():
        return x.gather(2, idx)
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


# ----------------------------------------------------------------------------- attention over the cache

def attend_cache(q, k, v, log_votes, lengths, scale, return_logits=False):
    """One query per sequence over the cache: softmax(q.k * scale + ln p) v.

    q [B, H, Dqk], k [B, H, S, Dqk], v [B, H, S, Dv], log_votes [B, H, S] (-inf: empty slot),
    lengths [B] (slots >= length are ignored). Returns out [B, H, Dv] and, if asked, the logits
    q.k * scale [B, H, S] without the votes. The contract of kernels.decode_attention_reference,
    so a Triton kernel can take this function's place on CUDA.
    """
    if q.is_cuda:  # the flash-decoding Triton kernel of kernels.py (NANOK2_KERNELS=torch: reference)
        return decode_attention_auto(q, k, v, log_votes.float(), lengths, scale, return_logits)
    cdt = _compute_dtype(q)
    S = k.shape[2]
    logits = torch.einsum("bhd,bhsd->bhs", q.to(cdt), k.to(cdt)) * scale
    valid = (torch.arange(S, device=k.device) < lengths[:, None])[:, None, :]          # [B, 1, S]
    logits = logits.masked_fill(~valid, NEG)
    log_w = logits + log_votes.to(cdt)                                                # ln p s
    m = log_w.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)        # nothing visible: zeros, not NaN
    w = torch.exp(log_w - m)
    denom = w.sum(-1, keepdim=True)
    out = torch.einsum("bhs,bhsd->bhd", w, v.to(cdt)) / torch.where(denom > 0, denom, 1.0)
    out = out.to(q.dtype)
    return (out, logits) if return_logits else out


# ----------------------------------------------------------------------------- ZIP merge (n-way)

def _to_targets(own, incoming, target):
    """own [.., Sk(, *)] plus the incoming rows [.., M(, *)] summed into their target index [.., M]."""
    idx = target if incoming.dim() == target.dim() else target[..., None].expand_as(incoming)
    return own.scatter_add(target.dim() - 1, idx, incoming)


def merge_entries(k, v, log_votes, log_score, k_in, v_in, log_votes_in, log_score_in, target, mask,
                  mode="zip", eps=1e-3, gamma_max=16.0, votes=True):
    """Merge incoming entries into kept ones; several may share one target.

    Kept: k [.., Sk, Dqk], v [.., Sk, Dv], log_votes / log_score [.., Sk] (ln p and ln sigma, the
    score the merge is tuned to, in log space). Incoming: the same with M rows; target [.., M]
    indexes Sk; only rows with mask [.., M] merge. Returns new (k, v, log_votes, log_score), where a
    target that takes no row comes back unchanged, and a [.., Sk] mask of the targets that took the
    guarded fall-back. Everything is done relative to each group's largest ln w, so no exp ever
    sees a large positive number.

    Fall-back: the key rescale gamma = L / lbar is 0/0 when the logits are near 0, flips the key
    when L and lbar differ in sign, and explodes as lbar -> 0. Outside |lbar| > eps and
    1/gamma_max < gamma < gamma_max, keep k_r = kbar and put the missing mass into the vote,
    ln p_r = ln sum p + L - lbar: p_r exp(lbar) = sum w still, so it is exact for the same query.
    The stored ln sigma_r is the logit k_r has when ln sigma are one query's logits (linear in k):
    L, or lbar for the fall-back and for "convex". So ZIP keeps ln p_r + ln sigma_r = ln sum w in
    both forms.
    votes=False: every entry has p = 1 and so has r; L = ln sum w, and the fall-back is inexact.
    """
    cdt = _compute_dtype(k)
    kf, vf, kin, vin = k.to(cdt), v.to(cdt), k_in.to(cdt), v_in.to(cdt)
    ln_p, ln_s = log_votes.to(cdt), log_score.to(cdt)
    ln_p_in = log_votes_in.to(cdt).masked_fill(~mask, NEG)         # non-merging rows weigh nothing
    ln_s_in = log_score_in.to(cdt).masked_fill(~mask, 0.0)
    lw, lw_in = ln_p + ln_s, ln_p_in + ln_s_in                     # ln w = ln p + ln s
    m = lw.scatter_reduce(-1, target, lw_in, reduce="amax", include_self=True)   # group max
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a, a_in = torch.exp(lw - m), torch.exp(lw_in - m.gather(-1, target))         # w / e^m, in [0, 1]
    A = _to_targets(a, a_in, target)                                             # sum w / e^m
    kbar = _to_targets(a[..., None] * kf, a_in[..., None] * kin, target) / A[..., None]
    vbar = _to_targets(a[..., None] * vf, a_in[..., None] * vin, target) / A[..., None]
    lbar = _to_targets(a * torch.nan_to_num(ln_s, neginf=0.0), a_in * ln_s_in, target) / A
    mp = ln_p.scatter_reduce(-1, target, ln_p_in, reduce="amax", include_self=True)
    mp = torch.where(torch.isfinite(mp), mp, torch.zeros_like(mp))
    P = _to_targets(torch.exp(ln_p - mp), torch.exp(ln_p_in - mp.gather(-1, target)), target)
    ln_sum_p = mp + torch.log(P) if votes else torch.zeros_like(mp)   # votes off: p_r = 1, L = ln sum w
    L = m + torch.log(A) - ln_sum_p                                # ln(sum w / sum p)
    fallback = torch.zeros_like(L, dtype=torch.bool)
    if mode == "zip":
        safe = lbar.abs() > eps
        gamma = L / torch.where(safe, lbar, torch.ones_like(lbar))
        ok = safe & (gamma > 1 / gamma_max) & (gamma < gamma_max)
        k_new = kbar * torch.where(ok, gamma, torch.ones_like(gamma))[..., None]
        ln_p_new = torch.where(ok, ln_sum_p, ln_sum_p + (L - lbar if votes else 0.0))
        ln_s_new = torch.where(ok, L, lbar)                        # the logit k_new has: gamma lbar
        fallback = ~ok
    elif mode == "convex":
        k_new, ln_p_new, ln_s_new = kbar, ln_sum_p, lbar
    else:
        raise ValueError(f"unknown merge mode {mode!r}")
    touched = _to_targets(torch.zeros_like(a), mask.to(cdt), target) > 0       # got >= 1 entry
    t4 = touched[..., None]
    return (torch.where(t4, k_new, kf).to(k.dtype), torch.where(t4, vbar, vf).to(v.dtype),
            torch.where(touched, ln_p_new, ln_p).to(log_votes.dtype),
            torch.where(touched, ln_s_new, ln_s).to(log_score.dtype), touched & fallback)


# ----------------------------------------------------------------------------- ZIP's prediction: ln sigma

def ema_window_scores(q, k, scale, alpha, obs_window):
    """ln sigma per entry from the last obs_window queries (q, k [B, Hk, T, Dqk]) -> [B, Hk, T].

    The decode recurrence sigma <- alpha sigma + (1 - alpha) s unrolled, each entry starting at its
    first observation: weight alpha^(T-1-i) for that query, (1 - alpha) alpha^(T-1-i) for later ones.
    """
    T = q.shape[2]
    Tw = min(obs_window, T)
    i = torch.arange(T - Tw, T, device=q.device)                   # observing queries
    j = torch.arange(T, device=q.device)                           # entries
    logits = torch.einsum("bgid,bgjd->bgij", q[:, :, T - Tw:], k) * scale     # [B, Hk, Tw, T]
    age = (T - 1 - i).to(logits.dtype)[:, None]
    later = i[:, None] > j.clamp(min=T - Tw)[None, :]              # not the entry's first observer
    weight = torch.full_like(age, alpha) ** age * (1 - alpha) ** later.to(age.dtype)
    log_w = torch.log(weight).masked_fill(i[:, None] < j[None, :], NEG)       # causal
    return torch.logsumexp(logits + log_w, dim=2)


def ema_(cfg, log_pred, logits, is_new):
    """Fold one query's logits [B, Hk, S] into the prediction ln sigma (in place): the EMA in log
    space; entries where is_new start at their first score."""
    log_alpha = math.log(cfg.alpha) if cfg.alpha > 0 else NEG
    ema = torch.logaddexp(log_pred + log_alpha, logits + math.log(1 - cfg.alpha))
    log_pred.copy_(torch.where(is_new, logits, ema))


def observe_(cfg, slots, logits, is_new):
    """A decode query's logits [B, Hk, S] (is_new: the slot it just wrote) update, in place, the
    slots' selection scores and, when they keep one, ZIP's prediction."""
    logits = logits.to(slots.log_score.dtype)
    accumulate_(cfg, slots.log_score, slots.log_votes, logits, is_new)
    if slots.log_pred is not None:
        ema_(cfg, slots.log_pred, logits, is_new)


# ----------------------------------------------------------------------------- the merge step

def best_targets(k_leave, k_kept, allowed=None, chunk=1024):
    """Most cosine-similar kept key per leaving key: (similarity, index) [B, Hk, M]."""
    kept = F.normalize(k_kept.float(), dim=-1)
    sims, idxs = [], []
    for start in range(0, k_leave.shape[2], chunk):
        sim = F.normalize(k_leave[:, :, start:start + chunk].float(), dim=-1) @ kept.mT   # [B, Hk, chunk, Sk]
        if allowed is not None:
            sim = sim.masked_fill(~allowed[:, :, None, :], -2.0)
        best = sim.max(-1)
        sims.append(best.values)
        idxs.append(best.indices)
    return torch.cat(sims, 2), torch.cat(idxs, 2)


def merge_targets(cfg, k_leave, k_kept, allowed=None):
    """Where each leaving entry goes, and whether it merges there (similarity above the threshold)
    or is evicted: target, merge [B, Hk, M]. `allowed` [B, Hk, Sk] masks kept entries out."""
    sim, target = best_targets(k_leave, k_kept, allowed)
    return target, sim > cfg.threshold


def merge_rows(cfg, kept, leaving, target, merge):
    """merge_entries with the policy's key merge and votes. Rows are (k, v, ln p, ln sigma): kept
    [.., Sk(, *)], leaving [.., M(, *)]. Returns the new kept rows and the [.., Sk] fall-back mask."""
    mode = "zip" if cfg.policy == "keepkv" else "convex"
    *new, fallback = merge_entries(*kept, *leaving, target, merge, mode, cfg.zip_eps, cfg.gamma_max, cfg.votes)
    return new, fallback


# ----------------------------------------------------------------------------- storage

class CacheSlots(nn.Module):
    """The storage of a compressed cache, which knows no policy: S slots, each an entry (the
    buffers named in `widths`: a key and a value, or MLA's latent [c | k_rope]), ln p, the
    selection's ln score, a position and, with pred=True, ZIP's predicted ln sigma (`log_pred`).

    Per group (this file): each key group (head) has its own entries; every buffer is
    [B, Hk, S(, *)], slot indices [B, Hk, M]. Shared (keepkv_latent.py): one entry serves all Hk
    groups, so entries are [B, S, *], positions [B, S] and slot indices [B, M], while ln p and the
    scores stay per group [B, Hk, S] (each head weighs a shared entry its own way). A slot is live
    while its ln p > -inf. The buffers never change shape, so a decode step over them compiles;
    `lengths` [B] is S throughout (attend_cache's contract: the votes mask empty slots).
    """
    GROUPED = ("log_votes", "log_score", "log_pred")   # per group in both layouts

    def __init__(self, batch, groups, n_slots, widths: dict, dtype=torch.float32, device=None, pred=False,
                 shared=False):
        super().__init__()
        self.entries, self.shared = tuple(widths), shared
        self.merged = (*self.entries, "log_votes", "log_pred")   # what a merge reads and writes, in order
        lead = (batch, n_slots) if shared else (batch, groups, n_slots)                # entries, positions
        meta_shape = (batch, groups, n_slots)
        meta = torch.float64 if dtype == torch.float64 else torch.float32     # ln p, ln sigma: fp32 at least
        for name, width in widths.items():
            self.register_buffer(name, torch.zeros(*lead, width, dtype=dtype, device=device))
        self.register_buffer("log_votes", torch.full(meta_shape, NEG, dtype=meta, device=device))
        self.register_buffer("log_score", torch.full(meta_shape, NEG, dtype=meta, device=device))
        self.register_buffer("pos", torch.zeros(lead, dtype=torch.int32, device=device))
        self.register_buffer("lengths", torch.full((batch,), n_slots, dtype=torch.int32, device=device))
        self.register_buffer("log_pred", torch.full(meta_shape, NEG, dtype=meta, device=device) if pred else None)

    @property
    def n_slots(self) -> int:
        return self.log_votes.shape[-1]

    def _meta(self):
        return [b for b in (self.log_votes, self.log_score, self.log_pred) if b is not None]

    def reset(self):
        for b in self._meta():
            b.fill_(NEG)

    def _slot_votes(self):
        """ln p per slot: [B, Hk, S], or [B, S] when shared (group 0 speaks for all)."""
        return self.log_votes[:, 0] if self.shared else self.log_votes

    def live(self) -> torch.Tensor:
        return self._slot_votes() > NEG

    def nbytes(self) -> int:
        """Total bytes held in the slots (entries, votes, scores, positions), all groups and rows."""
        bufs = [getattr(self, n) for n in self.entries] + [self.pos] + self._meta()
        return sum(b.numel() * b.element_size() for b in bufs)

    def _dim(self, name) -> int:
        """The slot dimension of buffer `name`: 2, or 1 for shared entries and positions."""
        return 1 if self.shared and name not in self.GROUPED else 2

    def _index(self, name, idx):
        """Slot indices idx, shaped to gather from or scatter into buffer `name`."""
        buf = getattr(self, name)
        if idx.dim() <= self._dim(name):          # shared slots, per-group buffer: every group alike
            idx = idx[:, None].expand(-1, buf.shape[1], -1)
        if buf.dim() > idx.dim():                 # an entry: a vector per slot
            idx = idx[..., None].expand(*idx.shape, buf.shape[-1])
        return idx

    def write_prefix(self, **rows):
        """Fill the first T slots: rows by buffer name, each shaped as its buffer with T slots
        (log_pred=None: not kept)."""
        for name, x in rows.items():
            if x is not None:
                getattr(self, name).narrow(self._dim(name), 0, x.shape[self._dim(name)]).copy_(x)

    def write_token(self, entry, t, in_order=False, offset=0):
        """One token (`entry`: its buffers in `widths` order, each [B, Hk, *], or [B, *] shared) at
        position t (a 0-d tensor) with one vote, into the first free slot (the caller keeps one
        free); returns that slot ([B, Hk, 1], or [B, 1] shared). in_order: nothing leaves any more
        (the prefill dropped `offset` positions), so that is slot t - offset: an in-place row
        write, no scatter (past the last slot: an index error). Scores: the policy's."""
        rows = [x.unsqueeze(-2).to(getattr(self, n).dtype) for n, x in zip(self.entries, entry)]   # 1 slot
        if in_order:
            idx = t.reshape(1) - offset
            for name, row in zip(self.entries, rows):
                getattr(self, name).index_copy_(self._dim(name), idx, row)
            self.log_votes.index_fill_(2, idx, 0.0)
            self.pos.index_fill_(self._dim("pos"), idx, t.to(torch.int32))
            return idx.expand(*self.pos.shape[:-1], 1)
        slot = (self._slot_votes() == NEG).to(torch.int32).argmax(-1, keepdim=True)   # first free
        self.put_rows(slot, rows, self.entries)
        self.log_votes.scatter_(2, self._index("log_votes", slot), 0.0)
        self.pos.scatter_(self._dim("pos"), slot, t.to(torch.int32).expand(slot.shape).contiguous())
        return slot

    def rows(self, idx, names=None):
        """The buffers `names` (default `merged`: the entry, ln p, ln sigma) at slots idx."""
        return tuple(getattr(self, n).gather(self._dim(n), self._index(n, idx)) for n in names or self.merged)

    def put_rows(self, idx, rows, names=None):
        """Write rows shaped as `rows(idx, names)` returns back at slots idx."""
        for name, row in zip(names or self.merged, rows):
            getattr(self, name).scatter_(self._dim(name), self._index(name, idx), row)

    def free(self, idx, where):
        """Empty the slots idx where `where` (shaped as idx) holds."""
        at = self._index("log_votes", idx)
        where = where if where.dim() == at.dim() else where[:, None]
        self.log_votes.scatter_(2, at, torch.where(where, NEG, self.log_votes.gather(2, at)))


# ----------------------------------------------------------------------------- statistics

# What a cache made with track=True counts: one float64 tensor per cache, which the decode steps
# add to on the device (no host sync). Per decode step: steps, removals, merges, ZIP fall-backs,
# the relative change of the attention output summed over removals and over merges only, and the
# latent merges' value residuals; at the prefill: the entries that left, and those of them merged.
STATS = ("steps", "removals", "merges", "fallbacks", "perturbation_sum", "perturbation_merged_sum",
         "value_residual_sum", "prefill_leaving", "prefill_merged")


def new_stats(device=None) -> torch.Tensor:
    return torch.zeros(len(STATS), dtype=torch.float64, device=device)


def count_(stats, **fields):
    """Add numbers or 0-d tensors to the named fields of a stats tensor, in place."""
    values = torch.stack([torch.as_tensor(v, device=stats.device) for v in fields.values()])
    stats[[STATS.index(name) for name in fields]] += values.double()


def stat_totals(caches) -> dict:
    """Each field summed over the caches."""
    return dict(zip(STATS, torch.stack([c.stats for c in caches]).sum(0).tolist()))


# ----------------------------------------------------------------------------- the cache

class KeepKVCache(nn.Module):
    """Fixed-size per-head cache: CacheSlots with one key group per head, run by the policy above.

    Implements model.KVCache's protocol: `attend(q, k, v, input_pos, scale)` with q/k [B, T, H,
    Dqk], v [B, T, H, Dv] -> [B, T, H, Dv]. The first call is the prefill (any T, positions from
    0); every later call decodes one token.
    """
    absorbed = False

    def __init__(self, batch, prompt_len, n_heads, qk_dim, v_dim, cfg: KVConfig, max_new_tokens=0,
                 dtype=torch.float32, device=None, track=False):
        super().__init__()
        self.cfg, self.track = cfg, track
        self.capacity = capacity(prompt_len, cfg, max_new_tokens)
        self.kept = capacity(prompt_len, cfg)                      # entries the prefill keeps
        S = self.capacity + (0 if cfg.policy in GROWING else 1)   # + the slot a new token lands in
        self.slots = CacheSlots(batch, n_heads, S, {"k": qk_dim, "v": v_dim}, dtype, device,
                                pred=cfg.policy in MERGING)
        self.offset = 0                 # GROWING: prompt positions the prefill dropped
        self.register_buffer("stats", new_stats(device))   # fields: STATS (track=True)
        self.prefilled = False

    # the slots' buffers under the names this cache's readers use
    k = property(lambda self: self.slots.k)
    v = property(lambda self: self.slots.v)
    log_votes = property(lambda self: self.slots.log_votes)
    log_score = property(lambda self: self.slots.log_score)
    log_pred = property(lambda self: self.slots.log_pred)
    pos = property(lambda self: self.slots.pos)
    lengths = property(lambda self: self.slots.lengths)

    def reset(self):
        self.slots.reset()
        self.stats.zero_()
        self.prefilled = False

    def nbytes(self) -> int:
        """Total bytes the cache stores: keys, values, votes, scores and positions of every slot."""
        return self.slots.nbytes()

    def live(self) -> torch.Tensor:
        return self.slots.live()

    def attend(self, q, k, v, input_pos, scale):
        if not self.prefilled:
            return self._prefill(q, k, v, input_pos, scale)
        if q.shape[1] != 1:
            raise ValueError("after the prefill a KeepKV cache takes one token per call")
        return self._decode(q[:, 0], k[:, 0], v[:, 0], input_pos[0], scale)[:, None]

    def compress(self, q, k, v, input_pos, scale):
        """The prefill's compression without its attention output, for a caller that has the
        output already (a benchmark that shares one exact prefill among many caches)."""
        self._prefill(q, k, v, input_pos, scale, output=False)

    # --- prefill: exact causal attention over the prompt, then compress once ---------------------

    @torch.no_grad()
    def _prefill(self, q, k, v, input_pos, scale, output=True):
        cfg, Sk, slots = self.cfg, self.kept, self.slots
        self.reset()
        cdt = _compute_dtype(q)
        qh, kh, vh = (x.transpose(1, 2).to(cdt) for x in (q, k, v))                  # [B, H, T, *]
        B, H, T, _ = qh.shape
        # zero-padding v to the key width lets SDPA pick its flash kernel (~6x faster on CPU at 2k)
        Dv = vh.shape[-1]
        out = F.scaled_dot_product_attention(qh, kh, F.pad(vh, (0, max(0, kh.shape[-1] - Dv))),
                                             is_causal=True, scale=scale)[..., :Dv] if output else None
        meta = slots.log_score.dtype
        score = prefill_scores(cfg, qh, kh, scale).to(meta)
        log_votes = torch.zeros(B, H, T, dtype=meta, device=q.device)
        pred = ema_window_scores(qh, kh, scale, cfg.alpha, cfg.obs_window).to(meta) if cfg.policy in MERGING else None
        pos = input_pos.to(torch.int32).expand(B, H, T)
        if T > Sk:  # the selection keeps Sk; the rest merge or leave
            keep, leave = split_prompt(cfg, score, pos, int(input_pos[-1]), Sk)
            if merges_at(cfg, "prefill"):
                kept, leaving = ([_take(x, i) for x in (kh, vh, log_votes, pred)] for i in (keep, leave))
                target, merge = merge_targets(cfg, leaving[0], kept[0])
                (kh, vh, log_votes, pred), _ = merge_rows(cfg, kept, leaving, target, merge)
                score = merged_scores(_take(score, keep), _take(score, leave), target, merge)
                if self.track:
                    count_(self.stats, prefill_leaving=merge.numel(), prefill_merged=merge.sum())
            else:
                kh, vh, log_votes, score = (_take(x, keep) for x in (kh, vh, log_votes, score))
                pred = None if pred is None else _take(pred, keep)
            pos = _take(pos, keep)
        slots.write_prefix(k=kh, v=vh, log_votes=log_votes, log_score=score, pos=pos, log_pred=pred)
        self.offset = T - kh.shape[2]
        self.prefilled = True
        return out.transpose(1, 2).to(q.dtype) if output else None

    # --- decode: one token in and attended over, at most one entry out ---------------------------

    def _merge_one(self, leave, over, live):
        """Merge the leaving slot [B, H, 1] into the most similar other live slot, where the cache
        is over capacity and the keys are similar enough. Returns the merge and fall-back masks."""
        s, names = self.slots, (*self.slots.merged, "log_score")        # k, v, ln p, ln sigma, score
        leaving = s.rows(leave, names)
        others = live & (torch.arange(s.n_slots, device=live.device) != leave)
        target, similar = merge_targets(self.cfg, leaving[0], s.k, others)          # [B, H, 1]
        merge, zero = over & similar, torch.zeros_like(target)
        kept = s.rows(target, names)
        new, fallback = merge_rows(self.cfg, kept[:4], leaving[:4], zero, merge)
        score = merged_scores(kept[4], leaving[4], zero, merge)
        s.put_rows(target, (*new, score), names)        # unchanged where nothing merged
        return merge, fallback

    @torch.no_grad()
    def _decode(self, q, k, v, t, scale):
        """q, k [B, H, Dqk], v [B, H, Dv], t: this token's position (0-d tensor) -> [B, H, Dv]."""
        cfg, s = self.cfg, self.slots
        if cfg.policy in GROWING:
            s.write_token((k, v), t, in_order=True, offset=self.offset)
            return attend_cache(q, s.k, s.v, s.log_votes, s.lengths, scale)
        slot = s.write_token((k, v), t)
        out_before, logits = attend_cache(q, s.k, s.v, s.log_votes, s.lengths, scale, True)
        observe_(cfg, s, logits, torch.arange(s.n_slots, device=q.device) == slot)   # is_new [B, H, S]
        live = s.live()
        over = live.sum(-1, keepdim=True) > self.capacity                           # [B, H, 1]
        leave = leaving_slot(cfg, s.log_score, s.pos, live, t, self.capacity)        # [B, H, 1]
        merged = fb = torch.zeros_like(over)
        if merges_at(cfg, "decode"):
            merged, fb = self._merge_one(leave, over, live)
        s.free(leave, over)                             # merged or evicted, the slot is free again
        out = attend_cache(q, s.k, s.v, s.log_votes, s.lengths, scale) if cfg.reattend or self.track else None
        if self.track:  # how much did this step's removal move the attention output?
            o0, o1 = out_before.float(), out.float()
            rel = (o1 - o0).norm(dim=-1) / o0.norm(dim=-1).clamp_min(1e-30)              # [B, H]
            count_(self.stats, steps=1, removals=over.sum(), merges=merged.sum(), fallbacks=fb.sum(),
                   perturbation_sum=(rel * over[..., 0]).sum(), perturbation_merged_sum=(rel * merged[..., 0]).sum())
        return out if cfg.reattend else out_before


# ----------------------------------------------------------------------------- helpers

def make_caches(model, batch: int, prompt_len: int, cfg: KVConfig, max_new_tokens: int = 0,
                dtype=None, track: bool = False):
    """One KeepKVCache per layer of `model` (a model.Transformer), sized for this prompt."""
    a, dev = model.args, model.embed.weight.device
    dtype = dtype or model.embed.weight.dtype
    return [KeepKVCache(batch, prompt_len, a.n_heads, a.qk_head_dim, a.v_head_dim, cfg, max_new_tokens,
                        dtype, dev, track) for _ in model.layers]


def full_cache_bytes(model, batch: int, n_tokens: int, dtype=None) -> int:
    """What model.KVCache (per-head keys and values, nothing else) takes for n_tokens."""
    a = model.args
    item = (dtype or model.embed.weight.dtype).itemsize
    return a.n_layers * batch * n_tokens * a.n_heads * (a.qk_head_dim + a.v_head_dim) * item


def cache_stats(caches) -> dict:
    """Totals over layers from caches made with track=True."""
    s = stat_totals(caches)
    mean = lambda total, n: s[total] / s[n] if s[n] else 0.0  # noqa: E731
    return {"removals": s["removals"], "merges": s["merges"], "fallbacks": s["fallbacks"],
            "perturbation": mean("perturbation_sum", "removals"),                  # over removals (decode)
            "perturbation_merged": mean("perturbation_merged_sum", "merges"),      # over merges only
            "prefill_merge_frac": mean("prefill_merged", "prefill_leaving")}
