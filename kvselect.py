"""Selection: which entries of a fixed-size KV cache stay and which leave (eviction policies).

A selection is a score per entry, a recent part that never leaves, and one rule: of the rest, the
highest scores stay. keepkv.py runs these on its slots, alone ("h2o", "snapkv", "streaming") or as
the outside selection whose drops KeepKV merges (arXiv 2504.09936 takes H2O in its ablation).

- "h2o" (H2O, arXiv 2306.14048): the score is the softmax attention every query so far gave the
  entry, summed (votes included: an entry with p votes draws the share of p copies). The most
  recent floor(recent x Sk) tokens stay (H2O: half of Sk), the heaviest of the rest fill Sk.
- "snapkv" (SnapKV, arXiv 2404.14469, its code's defaults): at prefill the last snap_window = 32
  prompt queries vote (softmax attention, summed) on the keys before them, votes average-pooled
  over `pool` = 5 keys (zero padding counted); the top Sk - 32 stay beside the whole window (Sk < 32:
  the last Sk). SnapKV itself compresses only the prompt, so its cache would grow by every new
  token; here it HOLDS Sk instead, so that every policy keeps the same number of entries after the
  prefill and after each step: while decoding, scores accumulate as in H2O (the window's own keys
  start from the attention the window gave them) and the lightest entry outside the last
  min(32, Sk) positions leaves.
- "streaming" (StreamingLLM, arXiv 2309.17453): the n_sink first tokens and the most recent ones.

Scores are ln of attention sums, kept per key group [B, Hk, S] (Hk: the heads, or 1 where one
decision serves them all: the latent cache). Sizes: model.py's symbols (Sk entries kept).
A merged entry's score is its parts' scores summed (`merged_scores`): it draws their share.
"""
import math

import torch
import torch.nn.functional as F

SELECTIONS = ("h2o", "snapkv", "streaming")
NEG = float("-inf")


def selection(cfg) -> str:
    """The selection a config runs: its policy's own, or `select` for a merging policy."""
    return cfg.policy if cfg.policy in SELECTIONS else cfg.select


# ----------------------------------------------------------------------------- scores

def attention_mass(q, k, scale, first_query, chunk=256):
    """Sum over queries i >= first_query of softmax_i(j) (causal), q, k [B, Hk, T, Dqk] -> [B, Hk, T]."""
    T = q.shape[2]
    total = torch.zeros(q.shape[:2] + (T,), dtype=q.dtype, device=q.device)
    j = torch.arange(T, device=q.device)
    for start in range(first_query, T, chunk):
        end = min(start + chunk, T)
        logits = torch.einsum("bgid,bgjd->bgij", q[:, :, start:end], k) * scale
        causal = torch.arange(start, end, device=q.device)[:, None] >= j[None, :]
        total += logits.masked_fill(~causal, NEG).softmax(-1).sum(2)
    return total


def _avg_pool(x, kernel):
    """Mean over `kernel` keys centred on each, zero padding counted: x [B, Hk, T] -> [B, Hk, T]."""
    B, Hk, T = x.shape
    return F.avg_pool1d(x.reshape(B * Hk, 1, T), kernel, stride=1, padding=kernel // 2,
                        count_include_pad=True).reshape(B, Hk, T)


def prefill_scores(cfg, q, k, scale):
    """ln score per prompt entry at the end of prefill: q, k [B, Hk, T, Dqk] -> [B, Hk, T]."""
    sel, T = selection(cfg), q.shape[2]
    if sel == "h2o":
        return attention_mass(q, k, scale, 0).log()
    if sel == "snapkv":  # the ranking pools the votes on the keys before the window only
        Tw = min(cfg.snap_window, T)
        mass = attention_mass(q, k, scale, T - Tw)
        window = torch.arange(T, device=q.device) >= T - Tw
        pooled = _avg_pool(mass.masked_fill(window, 0.0), cfg.pool)
        return torch.where(window, mass, pooled).log()
    return torch.zeros_like(q[..., 0])                             # streaming: recency decides


def accumulate_(cfg, log_score, log_votes, logits, is_new):
    """Add one query's softmax attention (logits [B, Hk, S] + votes) to the scores, in place;
    entries where is_new start afresh. Streaming keeps no score."""
    if selection(cfg) == "streaming":
        return
    log_attn = torch.log_softmax(logits + log_votes, -1)
    log_score.copy_(torch.where(is_new, log_attn, torch.logaddexp(log_score, log_attn)))


def merged_scores(score, score_in, target, mask):
    """ln(e^score_j + sum of e^score_in_i over the rows i that merge into j): score [.., Sk],
    score_in, target, mask [.., M]. Relative to each target's largest term, so exp never overflows."""
    inc = score_in.masked_fill(~mask, NEG)
    m = score.scatter_reduce(-1, target, inc, reduce="amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.exp(score - m).scatter_add(-1, target, torch.exp(inc - m.gather(-1, target)))
    return m + torch.log(total)


# ----------------------------------------------------------------------------- who leaves

def keep_priority(cfg, score, pos):
    """How strongly each entry holds its place [B, Hk, S]; the weakest leave first."""
    return pos.to(score.dtype) if selection(cfg) == "streaming" else score


def recent_count(cfg, Sk):
    """How many of the newest positions the selection never removes, at capacity Sk (int or tensor)."""
    Sk = torch.as_tensor(Sk)
    sel = selection(cfg)
    if sel == "h2o":
        return (Sk * cfg.recent).floor().clamp(min=1).to(torch.int64)
    if sel == "snapkv":
        return Sk.clamp(max=cfg.snap_window)
    return torch.ones_like(Sk)    # streaming: the newest token (recency ranks the rest)


def pinned(cfg, pos, t, capacity=None):
    """Entries never removed while t is the newest position: the recent part (a share of the
    capacity, so it is needed: an int, or a tensor broadcasting to pos) and streaming's sinks."""
    if capacity is None:
        raise ValueError(f"pinned: policy {cfg.policy!r} needs capacity= (its recent part is part of Sk)")
    recent = pos > t - recent_count(cfg, capacity)
    return recent | (pos < cfg.n_sink) if selection(cfg) == "streaming" else recent


def split_prompt(cfg, score, pos, t, Sk):
    """End of prefill (t: the last prompt position): the Sk entries that stay, in slot order, and
    the T - Sk that leave: [B, Hk, Sk], [B, Hk, T - Sk]."""
    priority = keep_priority(cfg, score, pos).masked_fill(pinned(cfg, pos, t, Sk), math.inf)
    order = priority.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :Sk].sort(-1).values, order[..., Sk:]


def leaving_slot(cfg, score, pos, live, t, capacity):
    """Decode (t: the new token's position): the live, unpinned slot with the weakest hold
    [B, Hk, 1]. It leaves only if Sk + 1 are live; that is the caller's to decide."""
    priority = keep_priority(cfg, score, pos)
    return priority.masked_fill(~live | pinned(cfg, pos, t, capacity), math.inf).argmin(-1, keepdim=True)
