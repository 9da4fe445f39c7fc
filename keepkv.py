"""KeepKV: a KV cache that merges what it drops, for the per-head (naive) MLA cache.

A compressed cache keeps a fixed number of entries per head. Evicting an entry loses its share of
the softmax; merging it into a similar entry keeps some of it, but a plain average still changes
the attention output. KeepKV (arXiv 2504.09936) changes it by nothing, for the query it is tuned to.

1. Electoral votes. Each entry carries a vote count p (1 for a new token) and attention over the
   cache is  o = sum_i p_i s_i v_i / sum_i p_i s_i  with  s_i = exp(q.k_i * scale),  i.e. a softmax
   over  logit_i + ln p_i.  An entry with p = 3 acts exactly like three copies of itself. We store
   ln p (`log_votes`), so the votes are just an additive bias on the logits (-inf: an empty slot).
2. ZIP merging. Merge entries i (weights w_i = p_i s_i) into one entry r with
       v_r = sum w_i v_i / sum w_i,   p_r = sum p_i,
       k_r = kbar * L / lbar,   kbar = sum w_i k_i / sum w_i,   lbar = sum w_i ln s_i / sum w_i,
   where L = ln(sum w_i / sum p_i). Logits are linear in k, so q.k_r*scale = (L / lbar) lbar = L,
   hence p_r s_r = sum w_i and p_r s_r v_r = sum w_i v_i: numerator and denominator both stay.
   All of it is computed relative to the largest ln w_i, so exp never sees a large number. When
   lbar is near 0 (0/0) or the rescale L / lbar would flip or blow up the key, a guarded form keeps
   k_r = kbar and moves the difference into the vote, ln p_r = ln sum p_i + L - lbar: also exact.
   Its stored score is then ln S_r = lbar, the logit kbar really has (L on the main path), so
   p_r S_r = sum w either way. A convex merge (k_r = kbar with the same weights, as the authors'
   released code does) gets the logit lbar >= L instead (ln of a mean <= the tilted mean), so it
   draws more attention than its parts.
3. Predicting s. ZIP is exact only for the query whose scores it used. Later queries differ, so
   KeepKV merges with a predicted score S in place of s: an exponential moving average per entry,
   S_t = alpha S_{t-1} + (1 - alpha) s_t, kept as ln S (`log_score`, via logaddexp) so exp never
   overflows. At the end of prefill the EMA runs over the last `obs_window` prompt queries. Each
   entry starts at its first observed score, not at 0 with the paper's 1/(1 - alpha^t) bias
   correction: the weights still sum to 1 (a constant score is predicted exactly), the first
   observation weighs a little more, and there is no per-entry step count to store. alpha = 0
   predicts "the current query", and only then is a merge exact. Choice: alpha = 0.8,
   obs_window = 16, from the sweep of `python bench.py kv` on the tiny model at budget 0.1:
   alpha = 0 makes every merge exact yet loses the most NLL (one query's scores pick the kept
   entries too noisily), 0.5 to 0.9 are within noise of each other, 0.95 lags, and the window
   length barely matters.
4. Selection. Which entries leave comes from the policy: keep `n_sink` first tokens, the last
   `window` tokens and the entries with the largest predicted weight ln p + ln S. Each leaving
   entry merges into the kept entry whose key has the highest cosine similarity if it exceeds
   `threshold` (0.8, the paper's T), otherwise it is evicted. Several leaving entries may share a
   target: the formulas above are n-way.

Policies on this one cache: "keepkv" (above), "convex" (same selection and targets, convex key
merge with votes: the released code's merge), "streaming" (StreamingLLM, arXiv 2309.17453: attention
sinks + the most recent tokens), "full" (no compression), and, each as its paper has it, no sinks:
- "h2o" (H2O, arXiv 2306.14048): accumulated softmax attention of every query; half the budget
  holds the most recent C // 2 tokens, the other C - C // 2 the heaviest of the rest.
- "snapkv" (SnapKV, arXiv 2404.14469, its code's defaults): the last snap_window = 32 prompt queries
  vote (softmax attention, summed) on the keys before them, votes average-pooled over `pool` = 5
  keys (zero padding counted); the top C - 32 stay beside the whole window (C < 32: the last C).
  Once, at prefill: decoding only appends, so the cache ends at C + new tokens.
- "snapkv-decode", this project's earlier variant: votes of the last obs_window queries (pooled
  without the padding), then accumulating like H2O while decoding, to hold C.
keepkv, convex, streaming and snapkv-decode keep the n_sink first and the last `window` tokens.

Budget = fraction of the prompt KEPT: capacity C = max(ceil(budget * prompt), n_sink + window),
the same C for every policy. Compression runs once at the end of prefill, then (but for "snapkv")
once per decoded token: the new token takes the one free slot (C + 1 slots in all), the query
attends over all C + 1 (its logits also update S), and if C + 1 are live one leaves (merged or
evicted) for the next steps. One pass per step. The alternative, compress then attend again
(`reattend=True`), lets the query that chose a merge see it (with alpha = 0 a merged step returns
exactly the C + 1 entries' output, so it tests ZIP), at a second pass. Measured by `bench.py kv`
(latent keepkv at b = 0.1 on the testbed, 32 windows): dNLL +0.067 attending once vs +0.068
attending twice, equal within noise, so once is the default. Shapes are static and nothing syncs
with the host: the decode step compiles.

The code follows the seams of the idea: attention over the cache, the ZIP merge, scoring (ln S),
selection (who leaves), the merge step (where it goes), storage (`CacheSlots`, which knows no
policy), and `KeepKVCache`, which runs the policy over its slots. All but the attention work on G
key groups, not on heads as such.

MLA: this cache holds the per-head keys and values the naive MLA path builds (G = H), where a
merge is exact per head, at H(Dn+Dr+Dv) numbers per entry. A model serves from its latent cache
(C+Dr per entry, 35.6x fewer on K2): keepkv_latent.py runs these policies there, per-head votes.

Shape legend: B batch, H heads, G key groups (H here), T prompt tokens, W observing queries, N
cache slots, C kept entries (N = C + 1; C + new for "full", "snapkv"), M leaving entries, Dqk / Dv
key / value widths, D either width; `..` stands for leading dimensions (B, G).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import decode_attention_auto

POLICIES = ("keepkv", "convex", "h2o", "snapkv", "snapkv-decode", "streaming", "full")
MERGING = ("keepkv", "convex")
GROWING = ("snapkv", "full")   # nothing leaves after the prefill: each new token takes a new slot
NEG = float("-inf")


@dataclass
class KVConfig:
    policy: str = "keepkv"
    budget: float = 0.1        # fraction of the prompt kept (capacity, at least n_sink + window)
    n_sink: int = 4            # first tokens always kept (attention sinks; h2o, snapkv: none)
    window: int = 8            # most recent tokens always kept (h2o, snapkv: their own share)
    alpha: float = 0.8         # EMA of the predicted score; 0 = the current query only
    obs_window: int = 16       # prompt queries that seed the EMA (and snapkv-decode's votes)
    threshold: float = 0.8     # cosine similarity above which a leaving entry merges (paper: T)
    snap_window: int = 32      # SnapKV: the last prompt queries that vote, all kept (its default)
    pool: int = 5              # SnapKV average-pooling kernel over keys (its default)
    zip_eps: float = 1e-3      # |lbar| below this: guarded fall-back instead of the key rescale
    gamma_max: float = 16.0    # ... and also when the key rescale L/lbar leaves [1/g, g]
    reattend: bool = False     # decode: attend again after the removal (else: before it, once)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown KV policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"kv budget must be in (0, 1] (the fraction of the prompt kept), "
                             f"got {self.budget}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if self.n_sink < 0 or min(self.window, self.obs_window, self.snap_window, self.pool) < 1:
            raise ValueError("need n_sink >= 0, window >= 1, obs_window >= 1, snap_window >= 1, pool >= 1")
        if self.pool % 2 == 0:  # an even kernel with padding pool // 2 yields T + 1 pooled scores
            raise ValueError(f"pool must be odd (a window centred on each key), got {self.pool}; "
                             f"use {self.pool + 1}")


def capacity(prompt_len: int, cfg: KVConfig, max_new_tokens: int = 0) -> int:
    """The most entries a cache holds at once. C, kept at prefill and held while decoding, but
    C + max_new_tokens for the policies that only add after prefill (GROWING; "full": C = prompt)."""
    kept = math.ceil(cfg.budget * prompt_len - 1e-9)  # 0.1 * 250 is 25.000000000000004 in floats
    kept = prompt_len if cfg.policy == "full" else max(kept, cfg.n_sink + cfg.window)
    return kept + (max_new_tokens if cfg.policy in GROWING else 0)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _take(x, idx):
    """x [B, G, N(, D)] at idx [B, G, M] -> [B, G, M(, D)]."""
    if x.dim() == idx.dim():
        return x.gather(2, idx)
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


# ----------------------------------------------------------------------------- attention over the cache

def attend_cache(q, k, v, log_votes, lengths, scale, return_logits=False):
    """One query per sequence over the cache: softmax(q.k * scale + ln p) v.

    q [B, H, Dqk], k [B, H, N, Dqk], v [B, H, N, Dv], log_votes [B, H, N] (-inf: empty slot),
    lengths [B] (slots >= length are ignored). Returns out [B, H, Dv] and, if asked, the logits
    q.k * scale [B, H, N] without the votes. The contract of kernels.decode_attention_reference,
    so a Triton kernel can take this function's place on CUDA.
    """
    if q.is_cuda:  # the flash-decoding Triton kernel of kernels.py (NANOK2_KERNELS=torch: reference)
        return decode_attention_auto(q, k, v, log_votes.float(), lengths, scale, return_logits)
    cdt = _compute_dtype(q)
    N = k.shape[2]
    logits = torch.einsum("bhd,bhnd->bhn", q.to(cdt), k.to(cdt)) * scale
    valid = (torch.arange(N, device=k.device) < lengths[:, None])[:, None, :]          # [B, 1, N]
    logits = logits.masked_fill(~valid, NEG)
    log_w = logits + log_votes.to(cdt)                                                # ln p s
    m = log_w.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)        # nothing visible: zeros, not NaN
    w = torch.exp(log_w - m)
    denom = w.sum(-1, keepdim=True)
    out = torch.einsum("bhn,bhnd->bhd", w, v.to(cdt)) / torch.where(denom > 0, denom, 1.0)
    out = out.to(q.dtype)
    return (out, logits) if return_logits else out


# ----------------------------------------------------------------------------- ZIP merge (n-way)

def _to_targets(own, incoming, target):
    """own [.., C(, D)] plus the incoming rows [.., M(, D)] summed into their target index [.., M]."""
    idx = target if incoming.dim() == target.dim() else target[..., None].expand_as(incoming)
    return own.scatter_add(target.dim() - 1, idx, incoming)


def merge_entries(k, v, log_votes, log_score, k_in, v_in, log_votes_in, log_score_in, target, mask,
                  mode="zip", eps=1e-3, gamma_max=16.0):
    """Merge incoming entries into kept ones; several may share one target.

    Kept: k [.., C, Dqk], v [.., C, Dv], log_votes / log_score [.., C] (ln p and ln S, the score
    the merge is tuned to, in log space). Incoming: the same with M rows; target [.., M] indexes C;
    only rows with mask [.., M] merge. Returns new (k, v, log_votes, log_score), where a target
    that takes no row comes back unchanged, and a [.., C] mask of the targets that took the
    guarded fall-back. Everything is done relative to each group's largest ln w, so no exp ever
    sees a large positive number.

    Fall-back: the key rescale gamma = L / lbar is 0/0 when the logits are near 0, flips the key
    when L and lbar differ in sign, and explodes as lbar -> 0. Outside |lbar| > eps and
    1/gamma_max < gamma < gamma_max, keep k_r = kbar and put the missing mass into the vote,
    ln p_r = ln sum p + L - lbar: p_r exp(lbar) = sum w still, so it is exact for the same query.
    The stored ln S_r is the logit k_r has when ln S are one query's logits (linear in k): L, or
    lbar for the fall-back and for "convex". So ZIP keeps ln p_r + ln S_r = ln sum w in both forms.
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
    ln_sum_p = mp + torch.log(P)
    L = m + torch.log(A) - ln_sum_p                                # ln(sum w / sum p)
    fallback = torch.zeros_like(L, dtype=torch.bool)
    if mode == "zip":
        safe = lbar.abs() > eps
        gamma = L / torch.where(safe, lbar, torch.ones_like(lbar))
        ok = safe & (gamma > 1 / gamma_max) & (gamma < gamma_max)
        k_new = kbar * torch.where(ok, gamma, torch.ones_like(gamma))[..., None]
        ln_p_new = torch.where(ok, ln_sum_p, ln_sum_p + L - lbar)
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


# ----------------------------------------------------------------------------- scoring: ln S per entry

def ema_window_scores(q, k, scale, alpha, obs_window):
    """ln S per entry from the last obs_window queries (q, k [B, G, T, D]) -> [B, G, T].

    The decode recurrence S <- alpha S + (1 - alpha) s unrolled, each entry starting at its first
    observation: weight alpha^(T-1-i) for that query, (1 - alpha) alpha^(T-1-i) for later ones.
    """
    T = q.shape[2]
    W = min(obs_window, T)
    i = torch.arange(T - W, T, device=q.device)                    # observing queries
    j = torch.arange(T, device=q.device)                           # entries
    logits = torch.einsum("bgid,bgjd->bgij", q[:, :, T - W:], k) * scale      # [B, G, W, T]
    age = (T - 1 - i).to(logits.dtype)[:, None]
    later = i[:, None] > j.clamp(min=T - W)[None, :]               # not the entry's first observer
    weight = torch.full_like(age, alpha) ** age * (1 - alpha) ** later.to(age.dtype)
    log_w = torch.log(weight).masked_fill(i[:, None] < j[None, :], NEG)       # causal
    return torch.logsumexp(logits + log_w, dim=2)


def attention_mass(q, k, scale, first_query, chunk=256):
    """Sum over queries i >= first_query of softmax_i(j) (causal), q, k [B, G, T, D] -> [B, G, T]."""
    T = q.shape[2]
    total = torch.zeros(q.shape[:2] + (T,), dtype=q.dtype, device=q.device)
    j = torch.arange(T, device=q.device)
    for start in range(first_query, T, chunk):
        end = min(start + chunk, T)
        logits = torch.einsum("bgid,bgjd->bgij", q[:, :, start:end], k) * scale
        causal = torch.arange(start, end, device=q.device)[:, None] >= j[None, :]
        total += logits.masked_fill(~causal, NEG).softmax(-1).sum(2)
    return total


def _avg_pool(x, kernel, count_pad):
    """Mean over `kernel` keys centred on each, x [B, G, T] -> [B, G, T]; count_pad: padding counts."""
    B, G, T = x.shape
    return F.avg_pool1d(x.reshape(B * G, 1, T), kernel, stride=1, padding=kernel // 2,
                        count_include_pad=count_pad).reshape(B, G, T)


def prefill_log_scores(cfg, q, k, scale):
    """ln S per prompt entry at the end of prefill, by policy: q, k [B, G, T, D] -> [B, G, T]."""
    T = q.shape[2]
    if cfg.policy in MERGING:
        return ema_window_scores(q, k, scale, cfg.alpha, cfg.obs_window)
    if cfg.policy == "h2o":
        return attention_mass(q, k, scale, 0).log()
    if cfg.policy == "snapkv":  # votes land on the keys before the window only; its keys stay anyway
        W = min(cfg.snap_window, T)
        mass = attention_mass(q, k, scale, T - W)
        mass[..., T - W:] = 0.0                                    # = the zero padding past the end
        return _avg_pool(mass, cfg.pool, True).log()
    if cfg.policy == "snapkv-decode":
        return _avg_pool(attention_mass(q, k, scale, max(0, T - cfg.obs_window)), cfg.pool, False).log()
    return torch.zeros_like(q[..., 0])                             # streaming / full: unused


def observe_(cfg, log_score, log_votes, logits, is_new):
    """Fold one query's logits [B, G, N] into ln S (in place); entries where is_new start afresh.
    Nothing to fold for "snapkv" (nothing leaves), "streaming" (recency decides) and "full"."""
    if cfg.policy in MERGING:   # EMA of s in log space; a new entry starts at its first score
        log_alpha = math.log(cfg.alpha) if cfg.alpha > 0 else NEG
        ema = torch.logaddexp(log_score + log_alpha, logits + math.log(1 - cfg.alpha))
        log_score.copy_(torch.where(is_new, logits, ema))
    elif cfg.policy in ("h2o", "snapkv-decode"):   # accumulated softmax attention (votes included)
        log_attn = torch.log_softmax(logits + log_votes, -1)
        log_score.copy_(torch.where(is_new, log_attn, torch.logaddexp(log_score, log_attn)))


# ----------------------------------------------------------------------------- selection: who leaves

def keep_priority(cfg, log_votes, log_score, pos):
    """How strongly each entry [B, G, N] holds its place; the weakest leave first. Recency for
    "streaming", the predicted weight ln p + ln S for the merging policies, else the attention ln S."""
    if cfg.policy == "streaming":
        return pos.to(log_score.dtype)
    if cfg.policy in MERGING:
        return log_votes + log_score
    return log_score


def pinned(cfg, pos, t, capacity=None):
    """Entries the policy never removes while t is the newest position: the n_sink first and the
    last `window`; for "h2o" the last C // 2 and for "snapkv" the last min(snap_window, C), no sinks
    (their papers' recent parts, so they need capacity = C: an int, or a tensor broadcasting to pos)."""
    if cfg.policy in ("h2o", "snapkv"):
        if capacity is None:
            raise ValueError(f"pinned: policy {cfg.policy!r} needs capacity= (its recent part is part of C)")
        C = torch.as_tensor(capacity)
        return pos > t - (C // 2 if cfg.policy == "h2o" else C.clamp(max=cfg.snap_window))
    return (pos < cfg.n_sink) | (pos > t - cfg.window)


def split_prompt(cfg, log_votes, log_score, pos, t, C):
    """End of prefill (t: the last prompt position): the C entries that stay, in slot order, and
    the T - C that leave: [B, G, C], [B, G, T - C]."""
    priority = keep_priority(cfg, log_votes, log_score, pos).masked_fill(pinned(cfg, pos, t, C), math.inf)
    order = priority.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :C].sort(-1).values, order[..., C:]


def leaving_slot(cfg, log_votes, log_score, pos, live, t, capacity=None):
    """Decode (t: the new token's position): the live, unpinned slot with the weakest hold [B, G, 1].
    It leaves only if the cache is over capacity, C + 1 live; that is the caller's to decide. So
    capacity, if not given, is taken as the live count less one: C whenever it matters."""
    capacity = live.sum(-1, keepdim=True) - 1 if capacity is None else capacity
    priority = keep_priority(cfg, log_votes, log_score, pos)
    return priority.masked_fill(~live | pinned(cfg, pos, t, capacity), math.inf).argmin(-1, keepdim=True)


# ----------------------------------------------------------------------------- the merge step

def best_targets(k_leave, k_kept, allowed=None, chunk=1024):
    """Most cosine-similar kept key per leaving key: (similarity, index) [B, G, M]."""
    kept = F.normalize(k_kept.float(), dim=-1)
    sims, idxs = [], []
    for start in range(0, k_leave.shape[2], chunk):
        sim = F.normalize(k_leave[:, :, start:start + chunk].float(), dim=-1) @ kept.mT   # [B, G, chunk, C]
        if allowed is not None:
            sim = sim.masked_fill(~allowed[:, :, None, :], -2.0)
        best = sim.max(-1)
        sims.append(best.values)
        idxs.append(best.indices)
    return torch.cat(sims, 2), torch.cat(idxs, 2)


def merge_targets(cfg, k_leave, k_kept, allowed=None):
    """Where each leaving entry goes, and whether it merges there (similarity above the threshold)
    or is evicted: target, merge [B, G, M]. `allowed` [B, G, C] masks kept entries out."""
    sim, target = best_targets(k_leave, k_kept, allowed)
    return target, sim > cfg.threshold


def merge_rows(cfg, kept, leaving, target, merge):
    """merge_entries with the policy's key merge. Rows are (k, v, ln p, ln S): kept [.., C(, D)],
    leaving [.., M(, D)]. Returns the new kept rows and the [.., C] fall-back mask."""
    mode = "zip" if cfg.policy == "keepkv" else "convex"
    *new, fallback = merge_entries(*kept, *leaving, target, merge, mode, cfg.zip_eps, cfg.gamma_max)
    return new, fallback


# ----------------------------------------------------------------------------- storage

class CacheSlots(nn.Module):
    """The storage of a compressed cache, which knows no policy: N slots per key group, each with a
    key [B, G, N, Dqk], a value [B, G, N, Dv], ln p, ln S and a position [B, G, N].

    A slot is live while its ln p > -inf. The buffers never change shape, so a decode step over
    them compiles; `lengths` [B] is N throughout (attend_cache's contract: the votes mask empty slots).
    """
    ROWS = ("k", "v", "log_votes", "log_score")   # what a merge reads and writes, in merge_entries' order

    def __init__(self, batch, groups, n_slots, k_dim, v_dim, dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch, groups, n_slots)
        meta = torch.float64 if dtype == torch.float64 else torch.float32     # ln p, ln S: fp32 at least
        self.register_buffer("k", torch.zeros(*shape, k_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(*shape, v_dim, dtype=dtype, device=device))
        self.register_buffer("log_votes", torch.full(shape, NEG, dtype=meta, device=device))
        self.register_buffer("log_score", torch.full(shape, NEG, dtype=meta, device=device))
        self.register_buffer("pos", torch.zeros(shape, dtype=torch.int32, device=device))
        self.register_buffer("lengths", torch.full((batch,), n_slots, dtype=torch.int32, device=device))

    def reset(self):
        self.log_votes.fill_(NEG)
        self.log_score.fill_(NEG)

    def live(self) -> torch.Tensor:
        return self.log_votes > NEG

    def nbytes(self) -> int:
        """Total bytes held in the slots (keys, values, votes, scores, positions), all groups and rows."""
        bufs = (self.k, self.v, self.log_votes, self.log_score, self.pos)
        return sum(b.numel() * b.element_size() for b in bufs)

    def write_prefix(self, k, v, log_votes, log_score, pos):
        """Fill the first T slots from rows [B, G, T(, D)]."""
        T = k.shape[2]
        self.k[:, :, :T] = k.to(self.k.dtype)
        self.v[:, :, :T] = v.to(self.v.dtype)
        self.log_votes[:, :, :T] = log_votes
        self.log_score[:, :, :T] = log_score
        self.pos[:, :, :T] = pos

    def write_token(self, k, v, t, in_order=False, offset=0):
        """One token (k [B, G, Dqk], v [B, G, Dv], position t: a 0-d tensor) with one vote, into the
        first free slot (the caller keeps one free); returns that slot [B, G, 1]. in_order: nothing
        leaves any more (the prefill dropped `offset` positions), so that is slot t - offset: an
        in-place row write, no scatter (past the last slot: an index error). ln S: the policy's."""
        if in_order:
            idx = t.reshape(1) - offset
            self.k.index_copy_(2, idx, k[:, :, None].to(self.k.dtype))
            self.v.index_copy_(2, idx, v[:, :, None].to(self.v.dtype))
            self.log_votes.index_fill_(2, idx, 0.0)
            self.pos.index_fill_(2, idx, t.to(torch.int32))
            return idx.expand(*self.pos.shape[:2], 1)
        slot = (self.log_votes == NEG).to(torch.int32).argmax(-1, keepdim=True)   # first free [B, G, 1]
        self.k.scatter_(2, slot[..., None].expand(*slot.shape, k.shape[-1]), k[:, :, None].to(self.k.dtype))
        self.v.scatter_(2, slot[..., None].expand(*slot.shape, v.shape[-1]), v[:, :, None].to(self.v.dtype))
        self.log_votes.scatter_(2, slot, torch.zeros_like(slot, dtype=self.log_votes.dtype))
        self.pos.scatter_(2, slot, t.to(torch.int32).expand(slot.shape).contiguous())
        return slot

    def rows(self, idx):
        """(k, v, ln p, ln S) at slots idx [B, G, M]."""
        return tuple(_take(getattr(self, name), idx) for name in self.ROWS)

    def put_rows(self, idx, rows):
        """Write rows shaped as `rows(idx)` returns back at slots idx."""
        for name, row in zip(self.ROWS, rows):
            buf = getattr(self, name)
            buf.scatter_(2, idx if buf.dim() == 3 else idx[..., None].expand_as(row), row)

    def free(self, idx, where):
        """Empty the slots idx [B, G, M] where `where` [B, G, M] holds."""
        self.log_votes.scatter_(2, idx, torch.where(where, NEG, _take(self.log_votes, idx)))


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
        N = self.capacity + (0 if cfg.policy in GROWING else 1)   # + the slot a new token lands in
        self.slots = CacheSlots(batch, n_heads, N, qk_dim, v_dim, dtype, device)
        self.offset = 0                 # GROWING: prompt positions the prefill dropped
        # decode: steps, removals, merges, fall-backs, sum of the relative change of the attention
        # output over removals and over merges only; prefill: entries that left, and merged
        self.register_buffer("stats", torch.zeros(8, dtype=torch.float64, device=device))
        self.prefilled = False

    # the slots' buffers under the names this cache's readers use; `score` is ln S's older name
    k = property(lambda self: self.slots.k)
    v = property(lambda self: self.slots.v)
    log_votes = property(lambda self: self.slots.log_votes)
    log_score = score = property(lambda self: self.slots.log_score)
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

    # --- prefill: exact causal attention over the prompt, then compress once ---------------------

    @torch.no_grad()
    def _prefill(self, q, k, v, input_pos, scale):
        cfg, C, slots = self.cfg, self.kept, self.slots
        self.reset()
        cdt = _compute_dtype(q)
        qh, kh, vh = (x.transpose(1, 2).to(cdt) for x in (q, k, v))                  # [B, H, T, D]
        B, H, T, _ = qh.shape
        # zero-padding v to the key width lets SDPA pick its flash kernel (~6x faster on CPU at 2k)
        Dv = vh.shape[-1]
        out = F.scaled_dot_product_attention(qh, kh, F.pad(vh, (0, max(0, kh.shape[-1] - Dv))),
                                             is_causal=True, scale=scale)[..., :Dv]      # [B, H, T, Dv]
        log_score = prefill_log_scores(cfg, qh, kh, scale).to(slots.log_score.dtype)
        log_votes = torch.zeros(B, H, T, dtype=slots.log_votes.dtype, device=q.device)
        pos = input_pos.to(torch.int32).expand(B, H, T)
        rows = (kh, vh, log_votes, log_score)
        if T > C:  # keep the pinned and the top priorities; the rest merge or leave
            keep, leave = split_prompt(cfg, log_votes, log_score, pos, int(input_pos[-1]), C)
            kept, pos = [_take(x, keep) for x in rows], _take(pos, keep)
            if cfg.policy in MERGING:
                leaving = [_take(x, leave) for x in rows]
                target, merge = merge_targets(cfg, leaving[0], kept[0])
                kept, _ = merge_rows(cfg, kept, leaving, target, merge)
                if self.track:
                    self.stats[6] += merge.numel()
                    self.stats[7] += merge.sum()
            rows = kept
        slots.write_prefix(*rows, pos)
        self.offset = T - rows[0].shape[2]
        self.prefilled = True
        return out.transpose(1, 2).to(q.dtype)

    # --- decode: one token in and attended over, at most one entry out ---------------------------

    def _merge_one(self, leave, over, live):
        """Merge the leaving slot [B, H, 1] into the most similar other live slot, where the cache
        is over capacity and the keys are similar enough. Returns the merge and fall-back masks."""
        s = self.slots
        others = live & (torch.arange(s.k.shape[2], device=live.device) != leave)
        target, similar = merge_targets(self.cfg, _take(s.k, leave), s.k, others)   # [B, H, 1]
        merge = over & similar
        new, fallback = merge_rows(self.cfg, s.rows(target), s.rows(leave), torch.zeros_like(target), merge)
        s.put_rows(target, new)                         # unchanged where nothing merged
        return merge, fallback

    @torch.no_grad()
    def _decode(self, q, k, v, t, scale):
        """q, k [B, H, Dqk], v [B, H, Dv], t: this token's position (0-d tensor) -> [B, H, Dv]."""
        cfg, s = self.cfg, self.slots
        if cfg.policy in GROWING:
            s.write_token(k, v, t, in_order=True, offset=self.offset)
            return attend_cache(q, s.k, s.v, s.log_votes, s.lengths, scale)
        slot = s.write_token(k, v, t)
        out_before, logits = attend_cache(q, s.k, s.v, s.log_votes, s.lengths, scale, True)
        is_new = torch.arange(s.k.shape[2], device=q.device) == slot                 # [B, H, N]
        observe_(cfg, s.log_score, s.log_votes, logits.to(s.log_score.dtype), is_new)
        live = s.live()
        over = live.sum(-1, keepdim=True) > self.capacity                           # [B, H, 1]
        leave = leaving_slot(cfg, s.log_votes, s.log_score, s.pos, live, t, self.capacity)  # [B, H, 1]
        merged = fb = torch.zeros_like(over)
        if cfg.policy in MERGING:
            merged, fb = self._merge_one(leave, over, live)
        s.free(leave, over)                             # merged or evicted, the slot is free again
        out = attend_cache(q, s.k, s.v, s.log_votes, s.lengths, scale) if cfg.reattend or self.track else None
        if self.track:  # how much did this step's removal move the attention output?
            o0, o1 = out_before.float(), out.float()
            rel = (o1 - o0).norm(dim=-1) / o0.norm(dim=-1).clamp_min(1e-30)              # [B, H]
            self.stats[:6] += torch.stack([torch.ones_like(rel.sum()), over.sum(), merged.sum(), fb.sum(),
                                           (rel * over[..., 0]).sum(), (rel * merged[..., 0]).sum()]).double()
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
    s = torch.stack([c.stats for c in caches]).sum(0).tolist()
    return {"removals": s[1], "merges": s[2], "fallbacks": s[3],
            "perturbation": s[4] / s[1] if s[1] else 0.0,          # mean over removals (decode)
            "perturbation_merged": s[5] / s[2] if s[2] else 0.0,   # mean over merges only
            "prefill_merge_frac": s[7] / s[6] if s[6] else 0.0}
