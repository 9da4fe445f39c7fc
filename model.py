"""Kimi K2, the model: a DeepSeek-V3-layout Mixture-of-Experts transformer in one file.

Sources: the Kimi K2 report (arXiv 2507.20534) for the configuration; DeepSeek-V3 (arXiv
2412.19437) for the layout, MLA, the sigmoid router and aux-loss-free balancing; DeepSeek-V2 (arXiv
2405.04434) for MLA's low-rank keys and values and their absorption; YaRN (arXiv 2309.00071).

Read top to bottom:
  1. ModelArgs, imported from config.py (every number of the architecture, the presets).
  2. RMSNorm and RoPE (on Dr dims of each head only, with YaRN for long contexts).
  3. MLA, Multi-head Latent Attention: keys and values are rebuilt from a small latent c, so a
     decode cache can hold C+Dr numbers per token and layer instead of H(Dn+Dr+Dv).
  4. MoE: a sigmoid router whose bias picks experts but never weights them (aux-loss-free
     balancing), the routed experts as grouped matmuls, an always-on shared expert.
  5. Block and Transformer, built on the meta device, then `to_empty()` + `init_weights()`.
  6. Plumbing, skip on first read: the aux-loss hook. (The grouped matmul, a compilable custom op
     around torch._grouped_mm, lives in kernels.py with the other fast paths.)
The model knows nothing about distribution or optimizer steps (train.py and parallel.py own
those); for QK-Clip it only records each head's max logit when asked (`record_max_logits`).

Symbols used in every file: shape comments and shape-suffixed names (x_ND: N tokens by D dims)
in every file of the repository use these sizes, each with this one meaning:
  symbol  meaning                                    ModelArgs field       tiny  kimi-k2
  D       model dim (residual stream)                dim                    192     7168
  H       attention heads                            n_heads                  4       64
  Dn      per-head query/key dims without position   qk_nope_head_dim        32      128
  Dr      per-head query/key dims with RoPE          qk_rope_head_dim        16       64
  Dv      per-head value dims                        v_head_dim              32      128
  C       key/value latent c                         kv_lora_rank            64      512
  Cq      query latent (0: no wq_a/wq_b, q = wq(x))  q_lora_rank              0     1536
  E       routed experts                             n_routed_experts         8      384
  K       experts per token (top-k)                  n_activated_experts      2        8
  F       expert hidden dim                          moe_inter_dim           96     2048
  Derived: Dn+Dr (query/key width) 48 / 192; C+Dr (absorbed cache, per token and layer) 80 / 576;
  H(Dn+Dr+Dv) (naive cache, per token and layer) 320 / 20480.
  Set at run time: B batch, T query length (a prompt, at the prefill), S key length (the keys a
  query attends over: a cache's positions or slots), V vocabulary. In the MoE: N = B*T tokens,
  R = N*K routed (token, expert) pairs (the grouped matmul's rows), G expert groups.
  In the KV caches (keepkv.py, keepkv_latent.py, kvselect.py, benchmarks/): Sk entries a
  compressed cache keeps, its capacity (S = Sk + 1 while decoding: a slot for the new token),
  M entries leaving at once, Tw prompt queries that observe the keys (obs_window, snap_window),
  Hk key groups: the heads a cache scores apart (H, or 1 where one decision serves every head),
  Dqk a query/key width (Dn+Dr in MLA), Hkv key/value heads of a GQA model (SmolLM2: 3).
  `*` stands for any width, `..` for any leading dimensions.

Where attention happens: softmax(q.k * scale) v over the visible keys, in six places.
  1. Training forward (MLA.forward without a cache; also eval): SDPA, causal, on per-head q, k
     [B, H, T, Dn+Dr] and v [B, H, T, Dv], rebuilt from the latent by `expand_kv`.
  2. QK-Clip's max-logit path: the same forward, training with `record_max_logits` on (train.py,
     for MuonClip). kernels.attention_with_max also returns each head's max logit: on CUDA a
     Triton flash kernel's running max, elsewhere SDPA plus a chunked no-grad pass.
  3. Naive cached decode (`make_caches(absorbed=False)`): KVCache.attend stores path 1's per-head
     k and v and runs `attend_naive` over all slots, the unwritten ones masked.
  4. Absorbed latent decode (`make_caches(absorbed=True)`): the cache holds only c and k_rope.
     q_nope.(W_kc c) = (W_kc^T q_nope).c, so W_kc is folded into the query and all heads attend
     over the same c: multi-query attention with one key [c | k_rope], whose c part is also the
     value; W_v is applied after the weighted sum (`attend_absorbed`). Equal to 3 up to rounding.
  5. KeepKV on the per-head cache (keepkv.KeepKVCache, `generate.py --kv-cache per-head`): path
     3's protocol `attend(q, k, v, input_pos, scale)` over a fixed number of entries per head, each
     entry's ln(votes) added to its logits.
  6. KeepKV on the latent cache (keepkv_latent.LatentKeepKVCache, what generate.py uses): path 4's
     protocol `attend_latent(q_nope, q_rope, c, k_rope, w_kc, w_v, input_pos, scale)` over a fixed
     number of shared latent entries, with per-head ln(votes) added to each head's logits.
`attend_naive` and `attend_absorbed` stand side by side below: read them as a diff.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import PRESETS, ModelArgs, get_args  # noqa: F401 (PRESETS, get_args: so one import builds a preset's model)
from kernels import attention_with_max, grouped_mm


def f32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 activations are upcast for softmax, norms and routing; fp64 (used
    by the exactness tests) stays fp64."""
    return t if t.dtype == torch.float64 else t.float()


# ----------------------------------------------------------------------------- norm + rope

# MLA's two latent norms (q_norm, kv_norm) use this eps whatever norm_eps is: DeepSeek-V3's
# reference code and transformers (q_a_layernorm, kv_a_layernorm) fix it, so a released checkpoint
# with rms_norm_eps 1e-5 still has 1e-6 there.
LATENT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in at least fp32 whatever the activation dtype (bf16 on GPU)
        return F.rms_norm(f32(x), (x.shape[-1],), f32(self.weight), self.eps).type_as(x)


def yarn_inv_freq(args: ModelArgs) -> torch.Tensor:
    """RoPE inverse frequencies, one per rotary pair; YaRN-interpolated when args.yarn is set.

    YaRN keeps fast-rotating pairs (many turns within the original context) as they are, divides
    slow ones by `rope_factor` (interpolation), and ramps linearly in between. The ramp edges are
    the pairs that rotate beta_fast resp. beta_slow times over the original context.
    """
    dim, base = args.qk_rope_head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    # An explicit switch, not max_seq_len > original_seq_len: a model pretrained at 4k trains with
    # plain RoPE at any length it is built for, and is extended (YaRN) on purpose. transformers
    # likewise applies YaRN whenever the config's rope_scaling says so.
    if not args.yarn:
        return inv_freq

    def pair_of(turns):  # the (fractional) rotary-pair index i whose frequency base^(-2i/dim)
        # makes `turns` rotations over original_seq_len
        return dim * math.log(args.original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(base))

    # clamped to dim - 1 as DeepSeek-V3's reference does, although pair indices end at dim/2 - 1
    low = max(math.floor(pair_of(args.beta_fast)), 0)
    high = min(math.ceil(pair_of(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 for fast pairs (unchanged), 0 for slow pairs (interpolated)
    return inv_freq / args.rope_factor * (1 - keep) + inv_freq * keep  # fp64; buffers cast it


def softmax_scale(args: ModelArgs) -> float:
    scale = args.qk_head_dim ** -0.5
    if args.yarn:  # YaRN's attention temperature: on exactly when its frequencies are
        m = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
        scale = scale * m * m
    return scale


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... x: [B, T, (H,) Dr]; cos/sin: [T, Dr/2]."""
    if x.dim() == 4:
        cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = f32(x)[..., 0::2], f32(x)[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- attention (MLA)
# Cached decode, the two forms side by side (paths 3 and 4 of the docstring). Same steps in the
# same order; comments mark where the absorbed form differs. Both return at least fp32.

def attend_naive(q, k_all, v_all, input_pos, scale):
    """q [B, T, H, Dn+Dr] over the cached per-head keys [B, S, H, Dn+Dr] and values [B, S, H, Dv]."""
    logits = torch.einsum("bthd,bshd->bhts", f32(q), f32(k_all)) * scale           # [B, H, T, S]
    visible = torch.arange(k_all.shape[1], device=q.device)[None, :] <= input_pos[:, None]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, f32(v_all))                      # [B, T, H, Dv]


def attend_absorbed(q_nope, q_rope, c_all, kr_all, w_kc, w_v, input_pos, scale):
    """The same over the cached latent c [B, S, C] and shared rotary key [B, S, Dr] only."""
    # differs: W_kc is folded into the query, which then lives in latent space
    q_lat = torch.einsum("bthd,hdc->bthc", f32(q_nope), f32(w_kc))                # [B, T, H, C]
    # differs: every head scores against the same key [c | k_rope]
    logits = (torch.einsum("bthc,bsc->bhts", q_lat, f32(c_all))
              + torch.einsum("bthr,bsr->bhts", f32(q_rope), f32(kr_all))) * scale  # [B, H, T, S]
    visible = torch.arange(c_all.shape[1], device=q_nope.device)[None, :] <= input_pos[:, None]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    # differs: the weighted sum runs over c itself, and W_v is applied after it
    o_lat = torch.einsum("bhts,bsc->bthc", probs, f32(c_all))                      # [B, T, H, C]
    return torch.einsum("bthc,hvc->bthv", o_lat, f32(w_v))                         # [B, T, H, Dv]


def absorbed_query(q_nope, q_rope, w_kc):
    """Path 4's per-head queries in latent space, [W_kc_h^T q_nope_h | q_rope_h]: [.., H, C+Dr]."""
    return torch.cat([torch.einsum("...hd,hdc->...hc", f32(q_nope), f32(w_kc)), f32(q_rope)], -1)


def attend_absorbed_prompt(Q, K, scale, n_latent):
    """Path 4 over a whole prompt (positions 0..T-1, causal): absorbed queries Q [B, T, H, C+Dr]
    over the keys K = [c | k_rope] [B, T, C+Dr] -> the latent outputs [B, T, H, C]. Multi-query
    SDPA: one key head for H query heads, and the key doubles as the value (its first C dims are c,
    the rest of the output is dropped), so neither [B, H, T, T] logits nor per-head copies of the
    prompt are built."""
    Kh = K.to(Q.dtype)[:, None]
    out = F.scaled_dot_product_attention(Q.transpose(1, 2), Kh, Kh, is_causal=True, scale=scale, enable_gqa=True)
    return out[..., :n_latent].transpose(1, 2)


class KVCache(nn.Module):
    """The naive MLA cache: per-head keys [B, S, H, Dn+Dr] and values [B, S, H, Dv]. Static
    buffers written at `input_pos`, attended over whole with a mask: a compiled decode step sees
    the same shapes every token."""
    absorbed = False

    def __init__(self, batch, max_len, n_heads, qk_dim, v_dim, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, max_len, n_heads, qk_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, max_len, n_heads, v_dim, dtype=dtype, device=device))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.k, self.v))

    def attend(self, q, k, v, input_pos, scale):
        self.k.index_copy_(1, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(1, input_pos, v.to(self.v.dtype))
        return attend_naive(q, self.k, self.v, input_pos, scale).type_as(q)


class LatentKVCache(nn.Module):
    """The absorbed MLA cache: the normalised latent c [B, S, C] and the rotary key [B, S, Dr]."""
    absorbed = True

    def __init__(self, batch, max_len, kv_lora_rank, rope_dim, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("c", torch.zeros(batch, max_len, kv_lora_rank, dtype=dtype, device=device))
        self.register_buffer("k_rope", torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.c, self.k_rope))

    def attend_latent(self, q_nope, q_rope, c, k_rope, w_kc, w_v, input_pos, scale):
        self.c.index_copy_(1, input_pos, c.to(self.c.dtype))
        self.k_rope.index_copy_(1, input_pos, k_rope.to(self.k_rope.dtype))
        if c.shape[1] > 1 and int(input_pos[0]) == 0:   # a prompt: attend over itself, no [T, S] logits
            o_lat = attend_absorbed_prompt(absorbed_query(q_nope, q_rope, w_kc), torch.cat([c, k_rope], -1),
                                           scale, c.shape[-1])
            return torch.einsum("bthc,hvc->bthv", o_lat, f32(w_v))
        return attend_absorbed(q_nope, q_rope, self.c, self.k_rope, w_kc, w_v, input_pos, scale)


class MLA(nn.Module):
    """Multi-head Latent Attention.

    query:  q = wq(x), or wq_b(q_norm(wq_a(x))) when Cq > 0  -> per head [q_nope (Dn) | q_rope (Dr)]
    kv:     wkv_a(x) = [c (C) | k_rope (Dr)];  wkv_b(kv_norm(c)) -> per head [k_nope (Dn) | v (Dv)]
    key:    per head [k_nope | k_rope], the rotary part shared by all heads.
    Row layout matters to QK-Clip: the query weight (wq or wq_b) viewed as [H, Dn+Dr, in] has each
    head's W_qc rows then its W_qr rows; wkv_b.weight.view(H, Dn+Dv, C) has W_kc rows then W_v rows.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        qk = args.qk_head_dim
        if args.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, args.n_heads * qk, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(args.q_lora_rank, args.n_heads * qk, bias=False)
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(args.kv_lora_rank, args.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(args.n_heads * self.v_dim, args.dim, bias=False)
        self.softmax_scale = softmax_scale(args)
        # QK-Clip reads the per-head max logit seen by training forwards (max over micro-batches)
        self.record_max_logits = False
        self.register_buffer("max_logits", torch.full((args.n_heads,), float("-inf")), persistent=False)

    def query(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)  # [B, T, H, Dn], [B, T, H, Dr]

    def latent(self, x, cos, sin):
        c, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        return self.kv_norm(c), apply_rope(k_rope, cos, sin)  # [B, T, C], [B, T, Dr]

    def expand_kv(self, c, k_rope):
        """Latent -> per-head keys [B, T, H, Dn+Dr] and values [B, T, H, Dv]."""
        B, T, _ = c.shape
        kv = self.wkv_b(c).view(B, T, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, T, self.n_heads, self.rope)], dim=-1)
        return k, v

    def forward(self, x, cos, sin, input_pos=None, cache=None):
        B, T, _ = x.shape
        q_nope, q_rope = self.query(x, cos, sin)
        c, k_rope = self.latent(x, cos, sin)
        if cache is not None and cache.absorbed:
            out = self.attend_latent(q_nope, q_rope, c, k_rope, input_pos, cache)
        elif cache is None:
            out = self.attend_sequence(q_nope, q_rope, c, k_rope)
        else:
            out = self.attend_per_head_cache(q_nope, q_rope, c, k_rope, input_pos, cache)
        return self.wo(out.reshape(B, T, self.n_heads * self.v_dim))

    def attend_sequence(self, q_nope, q_rope, c, k_rope):
        """Paths 1 and 2 (training, full forward): causal attention over the sequence itself."""
        q = torch.cat([q_nope, q_rope], dim=-1)                                    # [B, T, H, Dn+Dr]
        k, v = self.expand_kv(c, k_rope)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # [B, H, T, *]
        if self.record_max_logits and self.training:  # path 2
            out, m = attention_with_max(qh, kh, vh, self.softmax_scale)
            self.max_logits.copy_(torch.maximum(self.max_logits, m.to(self.max_logits.dtype)))
        else:  # path 1
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.softmax_scale)
        return out.transpose(1, 2)

    def attend_per_head_cache(self, q_nope, q_rope, c, k_rope, input_pos, cache):
        """Paths 3 (KVCache) and 5 (keepkv.KeepKVCache): per-head keys and values into the cache."""
        k, v = self.expand_kv(c, k_rope)
        return cache.attend(torch.cat([q_nope, q_rope], dim=-1), k, v, input_pos, self.softmax_scale)

    def attend_latent(self, q_nope, q_rope, c, k_rope, input_pos, cache):
        """Paths 4 and 6: attention on the latent itself, W_kc folded into the query, W_v after."""
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_kc, w_v = w[:, :self.nope], w[:, self.nope:]                             # [H, Dn, C], [H, Dv, C]
        return cache.attend_latent(q_nope, q_rope, c, k_rope, w_kc, w_v, input_pos, self.softmax_scale).type_as(c)


# ----------------------------------------------------------------------------- MoE

class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Dense layers and the shared expert."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """The router. Scores, selection and combine weights in (at least) fp32, also under autocast;
    `bias` (not trained by gradient) only picks experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk, self.route_scale = args.n_activated_experts, args.route_scale
        self.n_groups, self.topk_groups = args.n_expert_groups, args.n_limited_groups
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        # a buffer, so no optimizer touches it; saved in checkpoints; counted as a parameter
        self.register_buffer("bias", torch.zeros(args.n_routed_experts))

    def forward(self, x_ND):
        # autocast would run this linear in bf16 even on fp32 inputs (train.py uses it on CUDA):
        # scores a few 1e-3 apart then tie or swap, and tokens pick other experts
        with torch.autocast(x_ND.device.type, enabled=False):
            return self.route(f32(x_ND))

    def route(self, x_ND):
        scores_NE = F.linear(x_ND, f32(self.weight)).sigmoid()
        choice_NE = scores_NE + self.bias
        if self.n_groups > 1:  # keep the n_limited_groups groups with the best top-2 sums
            N = x_ND.shape[0]
            groups = choice_NE.view(N, self.n_groups, -1)                          # [N, G, E/G]
            group_score = groups.topk(2, dim=-1).values.sum(-1)                    # [N, G]
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(
                1, group_score.topk(self.topk_groups, dim=-1).indices, True)
            choice_NE = groups.masked_fill(~keep[..., None], float("-inf")).view(N, -1)
        idx_NK = choice_NE.topk(self.topk, dim=-1).indices
        w_NK = scores_NE.gather(1, idx_NK)                 # weights come from the unbiased scores
        w_NK = w_NK / w_NK.sum(-1, keepdim=True) * self.route_scale
        return w_NK, idx_NK, scores_NE

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, speed: float):
        """Aux-loss-free balancing (DeepSeek-V3): raise under-loaded experts, lower over-loaded."""
        self.bias += speed * torch.sign(f32(load_E).mean() - f32(load_E))


class MoE(nn.Module):
    """Routed experts stored stacked ([E, out, in]) plus a shared expert every token passes.
    Works on the N = B*T tokens as one flat batch."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, F_ = args.n_routed_experts, args.dim, args.moe_inter_dim
        self.n_experts, self.topk, self.aux_alpha = E, args.n_activated_experts, args.aux_loss_alpha
        self.aux_loss_scale = 1.0  # what the caller scales its loss by before backward (set_aux_loss_scale)
        self.gate = Gate(args)
        self.w1 = nn.Parameter(torch.empty(E, F_, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F_))
        self.w3 = nn.Parameter(torch.empty(E, F_, D))
        self.shared = MLP(D, args.n_shared_experts * F_)
        # (token, expert) pairs routed to each expert since the last bias update (read by
        # Transformer.update_router_bias, or all-reduced first by parallel.py)
        self.register_buffer("expert_load", torch.zeros(E), persistent=False)
        self.use_loop = False  # the readable reference path (tests compare the two)

    def forward(self, x):
        B, T, D = x.shape
        x_ND = x.reshape(-1, D)
        w_NK, idx_NK, scores_NE = self.gate(x_ND)
        if self.training:
            self.expert_load += torch.zeros_like(self.expert_load).index_add_(
                0, idx_NK.flatten(), torch.ones_like(idx_NK.flatten(), dtype=self.expert_load.dtype))
        routed = self.experts_loop if self.use_loop else self.experts_grouped
        y_ND = routed(x_ND, w_NK, idx_NK) + self.shared(x_ND)
        if self.training and self.aux_alpha > 0:  # the balance loss joins the objective in backward
            aux = self.balance_loss(scores_NE.view(B, T, -1), idx_NK.view(B, T, -1))
            y_ND = _AuxLoss.apply(y_ND, aux, self.aux_loss_scale)
        return y_ND.view(B, T, D)

    def experts_grouped(self, x_ND, w_NK, idx_NK):
        """Sort the R = N*K (token, expert) pairs by expert, run each projection of every expert as
        one grouped matmul, then scatter-add the weighted outputs back to their tokens. No host
        sync: the group offsets stay on the device. Pair p is token p // K's (p % K)-th choice."""
        K = idx_NK.shape[1]
        expert_of_pair = idx_NK.flatten()                                    # [R]
        pair_of_row = torch.argsort(expert_of_pair, stable=True)            # [R] rows grouped by expert
        token_of_row = pair_of_row // K                                      # [R]
        counts_E = torch.zeros(self.n_experts, dtype=torch.int32, device=x_ND.device).index_add_(
            0, expert_of_pair, torch.ones_like(expert_of_pair, dtype=torch.int32))
        offs_E = counts_E.cumsum(0, dtype=torch.int32)                       # end row of each group
        x_RD = x_ND[token_of_row]
        dt = torch.bfloat16 if x_ND.is_cuda else x_ND.dtype  # CUDA grouped GEMM wants bf16
        gmm = lambda a, w: grouped_mm(a.to(dt), w.to(dt).transpose(-2, -1), offs_E)  # kernels.py
        h_RF = F.silu(gmm(x_RD, self.w1)) * gmm(x_RD, self.w3)
        y_RD = gmm(h_RF, self.w2).to(x_ND.dtype)
        y_RD = y_RD * w_NK.flatten()[pair_of_row, None].to(y_RD.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_of_row, y_RD)

    def experts_loop(self, x_ND, w_NK, idx_NK):
        """Reference: one plain SwiGLU per expert over the tokens that picked it."""
        y_ND = torch.zeros_like(x_ND)
        for e in range(self.n_experts):
            tok, slot = torch.where(idx_NK == e)
            if tok.numel() == 0:
                continue
            h = F.silu(x_ND[tok] @ self.w1[e].T) * (x_ND[tok] @ self.w3[e].T)
            y_ND.index_add_(0, tok, (h @ self.w2[e].T) * w_NK[tok, slot, None].to(x_ND.dtype))
        return y_ND

    def balance_loss(self, scores_BTE, idx_BTK):
        """DeepSeek-V3 sequence-wise balance loss: alpha * sum_e f_e * P_e per sequence, mean over
        sequences. f_e = E/(K*T) * (tokens of the sequence routed to e); P_e = mean normalised score."""
        B, T, E = scores_BTE.shape
        hits = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
            1, idx_BTK.reshape(B, -1), torch.ones(B, T * self.topk, device=scores_BTE.device))
        f_BE = hits * E / (self.topk * T)
        p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
        return self.aux_alpha * (f_BE * p_BE).sum(-1).mean()


# ----------------------------------------------------------------------------- the model

class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)

    def forward(self, x, cos, sin, input_pos=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, input_pos, cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied from the embedding
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.qk_rope_head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.qk_rope_head_dim // 2), persistent=False)
        if self.rope_cos.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Fill every parameter and buffer (after `to_empty()` from the meta device)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)  # residual-branch outputs start small
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight", ".w2")):
                p.normal_(0.0, out_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
        for module in self.modules():
            if isinstance(module, Gate):
                module.bias.zero_()
            if isinstance(module, MoE):
                module.expert_load.zero_()
            if isinstance(module, MLA):
                module.max_logits.fill_(float("-inf"))
        t = torch.arange(self.args.max_seq_len, dtype=torch.float64, device=self.rope_cos.device)
        angles = torch.outer(t, yarn_inv_freq(self.args).to(t.device))
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    def forward(self, tokens, input_pos=None, caches=None):
        """tokens [B, T] -> logits [B, T, V]. Without caches: a causal pass over the sequence.
        With caches (one per layer): positions `input_pos` [T] are written and attended over."""
        B, T = tokens.shape
        if input_pos is None:
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.args.max_seq_len}")
            input_pos = torch.arange(T, device=tokens.device)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, input_pos, None if caches is None else caches[i])
        return f32(self.head(self.norm(h)))

    # --- helpers for the training loop (train.py, parallel.py), decoding and the tests ----

    def make_caches(self, batch: int, max_len: int, absorbed: bool = False, dtype=None):
        a, dev = self.args, self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        if absorbed:
            return [LatentKVCache(batch, max_len, a.kv_lora_rank, a.qk_rope_head_dim, dtype, dev)
                    for _ in self.layers]
        return [KVCache(batch, max_len, a.n_heads, a.qk_head_dim, a.v_head_dim, dtype, dev)
                for _ in self.layers]

    def moe_layers(self):
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    def set_aux_loss_scale(self, scale: float):
        """The balance loss joins the objective inside backward, unseen by the caller. A caller
        that backpropagates scale * LM loss (train.py: 1 / grad_accum per micro-batch) says so
        here, and the balance loss is scaled alike: alpha keeps its weight relative to the LM loss."""
        for moe in self.moe_layers():
            moe.aux_loss_scale = scale

    def set_record_max_logits(self, on: bool = True):
        for layer in self.layers:
            layer.attn.record_max_logits = on

    @torch.no_grad()
    def pop_max_logits(self) -> torch.Tensor:
        """[n_layers, n_heads] max attention logits recorded since the last call; resets them."""
        out = torch.stack([layer.attn.max_logits.clone() for layer in self.layers])
        for layer in self.layers:
            layer.attn.max_logits.fill_(float("-inf"))
        return out

    @torch.no_grad()
    def update_router_bias(self, loads=None):
        """Apply the bias rule once per optimizer step from the loads observed since the last call.
        `loads` (one tensor per MoE layer) lets train.py pass all-reduced global loads."""
        moes = self.moe_layers()
        loads = loads if loads is not None else [m.expert_load for m in moes]
        for moe, load in zip(moes, loads):
            moe.gate.update_bias(load, self.args.bias_update_speed)
            moe.expert_load.zero_()


def count_params(model: Transformer) -> tuple[int, int]:
    """(total, activated per token). Convention: every weight once, the embedding and the LM head
    both counted, router biases included; activated = total minus the routed experts a token does
    not use (n_routed - n_activated per MoE layer). Works on the meta device."""
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.gate.bias.numel() for m in model.moe_layers())
    a = model.args
    per_expert = 3 * a.dim * a.moe_inter_dim
    idle = len(model.moe_layers()) * (a.n_routed_experts - a.n_activated_experts) * per_expert
    return total, total - idle


def build_model(args: ModelArgs, device="cpu", seed: int | None = None) -> Transformer:
    """Meta-device construction (no memory), then allocate on `device` and initialise. With a
    seed the weights are drawn on the CPU and then moved, so a seed gives the same model on any
    device (and in parallel.py's FSDP2 seed checkpoint)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu" if seed is not None else device)
    model.init_weights(seed)
    return model.to(device)


# ----------------------------------------------------------------------------- plumbing
# Skip on first read: a mechanism the MoE above calls, not part of the architecture.

class _AuxLoss(torch.autograd.Function):
    """Identity on y whose backward also sends gradient `scale` into `aux`: adds scale * aux to the
    training objective without threading it through every module's return value."""

    @staticmethod
    def forward(ctx, y, aux, scale: float):
        ctx.aux_shape, ctx.scale = aux.shape, scale
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.aux_shape, ctx.scale, device=grad.device, dtype=grad.dtype), None
