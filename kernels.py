"""
kernels.py: the three GPU kernels nanoK2 cares about, each beside a readable torch reference,
and the grouped GEMM the MoE runs on.

1. Causal flash attention (FlashAttention-2, arXiv 2307.08691) for MLA training shapes (q, k:
   [B, H, T, 192], v: [B, H, T, 128]).
   The T x T score matrix never exists in memory: each program owns a block of queries, streams the
   keys past it and keeps a running max m and running sum l of exp(s - m) ("online softmax"). When a
   new block raises the max, the old sum and output accumulator are rescaled by exp(m_old - m_new).
   The forward saves only logsumexp per row; the backward recomputes the probabilities from it.
   For QK-Clip the forward also returns, per head, the max pre-softmax logit over the batch. That
   number is free: it is the final running max m of each query row, which online softmax tracks
   anyway. K2's head dims are not powers of two (192 = 128 nope + 64 rope); Triton blocks are, so
   head dims are padded up to the next power of two with masked loads (192 -> 256 lanes).
2. Decode attention over a KV cache (Flash-Decoding: Dao, Haziza, Massa, Sizov 2023,
   crfm.stanford.edu/2023/10/12/flashdecoding.html). One query per sequence cannot fill a GPU, so
   the keys are split into chunks, one program per (batch, head, chunk). Each writes a partial
   (max, sum of exp, unnormalised output) and a second small kernel merges them with log-sum-exp.
   A per-key additive bias carries KeepKV's ln(votes) and a per-sequence length hides empty slots.
3. The symmetric product A = X X^T used by Newton-Schulz (muonclip.py). A is symmetric, so only the
   tiles on or above the diagonal are computed; each is written twice (itself and its mirror),
   about half the FLOPs of X @ X.mT. Newton-Schulz's A @ A equals A A^T (A is symmetric), so this
   kernel could compute it too; muonclip.py does not use it there: its A @ A is a plain matmul.
4. (Not Triton.) The MoE's grouped expert GEMM: torch._grouped_mm wrapped as a custom op with its
   own shape function and backward, so a compiled MoE calls it in any dtype without a graph break.

For each kernel the file gives (a) the torch reference, (b) the @triton.jit kernel(s), (c) a thin
wrapper that checks inputs, allocates outputs and launches, and (d) a dispatcher for callers:
    attention_with_max(q, k, v, scale)       -> (out, max_logits)
    decode_attention_auto(q, k, v, bias, lengths, scale, return_logits=False)
    sym_matmul_auto(X)
Dispatchers pick Triton for CUDA tensors and torch elsewhere; the environment variable
NANOK2_KERNELS = "triton" | "torch" | "auto" (default) forces one path, read at each call.
On a CPU, Triton runs only under its interpreter: set TRITON_INTERPRET=1 before triton is first
imported (triton chooses at @triton.jit time). tests/test_kernels.py does that.
All kernels accumulate in fp32; inputs may be fp32 or bf16.
"""
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    # Without triton the module still imports: the dispatchers use torch, and forcing triton (or
    # calling a Triton wrapper) raises. These stand-ins only let the kernel definitions below parse.
    HAS_TRITON = False
    from types import SimpleNamespace
    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda **kw: (lambda fn: fn),
                             Config=lambda *a, **kw: None)
    tl = SimpleNamespace(constexpr=None)

LOG2E = 1.4426950408889634  # kernels use exp2: exp(x) = exp2(x * log2(e)), one multiply folded in scale


def _backend(x: torch.Tensor) -> str:
    """'triton' or 'torch' for this call, from NANOK2_KERNELS (read now) and the tensor's device."""
    choice = os.environ.get("NANOK2_KERNELS", "auto").lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"NANOK2_KERNELS must be 'auto', 'triton' or 'torch', got {choice!r}")
    if choice == "auto":
        return "triton" if (HAS_TRITON and x.is_cuda) else "torch"
    return choice


def _check_launchable(x: torch.Tensor):
    if not HAS_TRITON:
        raise RuntimeError("a Triton kernel was requested (NANOK2_KERNELS=triton or a direct call) "
                           "but triton is not installed; use NANOK2_KERNELS=torch")
    if not x.is_cuda and type(_sym_matmul_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton kernels need CUDA tensors; to run them on the CPU set "
                           "TRITON_INTERPRET=1 before triton is first imported")


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def _pow2(d: int) -> int:
    """Block width for a dimension of size d: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # F32 is set for fp32 inputs (exact "ieee" products, not tf32) and on the CPU interpreter,
    # whose tl.dot multiplies bf16 operands as raw uint16 bits (Triton 3.9): upcasting there keeps
    # the same numbers the GPU's bf16 tensor cores produce (exact products, fp32 sums).
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_tile(ptr, rows, n_rows, cols, n_cols):
    """Tile [rows, cols] of a contiguous [*, n_cols] matrix; zeros at rows >= n_rows, cols >= n_cols."""
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_tile(ptr, rows, n_rows, cols, n_cols, x):
    tl.store(ptr + rows[:, None] * n_cols + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


# ======================================================================================
# 1. Causal flash attention with the per-head max logit
# ======================================================================================

def attention_reference(q, k, v, scale):
    """Explicit fp32 softmax attention. q, k: [B, H, T, Dqk], v: [B, H, T, Dv].
    Returns out [B, H, T, Dv] (q's dtype) and max_logits [H] fp32 (no grad): the largest
    q_i . k_j * scale over the batch, the queries i and the keys j <= i."""
    T = q.shape[-2]
    s = (q.float() @ k.float().mT) * scale                             # [B, H, T, T]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    s = s.masked_fill(future, float("-inf"))
    max_logits = s.detach().amax(dim=(0, 2, 3))                        # [H]
    out = torch.softmax(s, dim=-1) @ v.float()
    return out.to(q.dtype), max_logits


@torch.no_grad()
def causal_max_logits(q, k, scale, chunk=1024):
    """Per-head max of the causal logits, a block of queries at a time (memory B*H*chunk*T)."""
    B, H, T, _ = q.shape
    best = torch.full((H,), float("-inf"), device=q.device)
    kf = k.float()
    for i0 in range(0, T, chunk):
        i1 = min(i0 + chunk, T)
        s = (q[:, :, i0:i1].float() @ kf[:, :, :i1].mT) * scale           # [B, H, i1-i0, i1]
        rows = torch.arange(i0, i1, device=q.device)[:, None]
        s.masked_fill_(torch.arange(i1, device=q.device) > rows, float("-inf"))
        best = torch.maximum(best, s.amax(dim=(0, 2, 3)))
    return best


def _attn_configs(kind):
    # (BLOCK_M, BLOCK_N, num_warps, num_stages). Each compiles for sm_90 at Dqk=192 (256 lanes),
    # Dv=128, bf16 without register spills and within the 227 KB of shared memory per block; all
    # but the last dkdv one use Hopper's wgmma (its dots need 64 rows, here BLOCK_N).
    table = {"fwd": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
             "dkdv": [(32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 2), (64, 32, 8, 3)],
             "dq": [(64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)]}
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in table[kind]]


@triton.jit
def _flash_fwd_kernel(Q, K, V, O, LSE, ROWMAX, T, DQK, DV, qk_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK_P: tl.constexpr,
                      DV_P: tl.constexpr, F32_DOT: tl.constexpr):
    # One program: BLOCK_M queries of one (batch, head). Tensors are contiguous [B*H, T, D].
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, O = Q + bh * T * DQK, K + bh * T * DQK, V + bh * T * DV, O + bh * T * DV
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk, offs_dv = tl.arange(0, DQK_P), tl.arange(0, DV_P)
    q = _load_tile(Q, offs_m, T, offs_dqk, DQK)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the logits (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, DV_P], tl.float32)          # running sum of exp2(s - m_i) v
    # Causal: keys after this block's last query are never needed. Key 0 is visible to every row,
    # so no row is ever fully masked and m_i is finite after the first step.
    for start_n in range(0, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, offs_n, T, offs_dqk, DQK)
        v = _load_tile(V, offs_n, T, offs_dv, DV)
        s = _dot(q, tl.trans(k), F32_DOT) * qk_scale                     # [BLOCK_M, BLOCK_N]
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)                                     # rescales the old state
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32_DOT)
        m_i = m_new
    _store_tile(O, offs_m, T, offs_dv, DV, acc / l_i[:, None])
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)
    tl.store(ROWMAX + bh * T + offs_m, m_i * 0.6931471805599453, mask=offs_m < T)  # x ln 2: natural units


@triton.jit
def _flash_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_OUT, T, DQK, DV, qk_scale, scale,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK_P: tl.constexpr,
                           DV_P: tl.constexpr, F32_DOT: tl.constexpr):
    # One program: BLOCK_N keys; it walks the queries that can see them (i >= first key) and sums
    #   dV_j = sum_i P_ij dO_i,   dK_j = scale * sum_i dS_ij q_i,   dS_ij = P_ij (dO_i . v_j - D_i).
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO = Q + bh * T * DQK, K + bh * T * DQK, V + bh * T * DV, DO + bh * T * DV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dqk, offs_dv = tl.arange(0, DQK_P), tl.arange(0, DV_P)
    k = _load_tile(K, offs_n, T, offs_dqk, DQK)
    v = _load_tile(V, offs_n, T, offs_dv, DV)
    dk = tl.zeros([BLOCK_N, DQK_P], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_P], tl.float32)
    for start_m in range(start_n, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, offs_m, T, offs_dqk, DQK)
        do = _load_tile(DO, offs_m, T, offs_dv, DV)
        lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
        # Work transposed ([keys, queries]) so that the sums over queries are plain dots.
        pT = tl.exp2(_dot(k, tl.trans(q), F32_DOT) * qk_scale - lse[None, :])
        pT = tl.where((offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < T), pT, 0.0)
        dv += _dot(pT.to(do.dtype), do, F32_DOT)
        dsT = pT * (_dot(v, tl.trans(do), F32_DOT) - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, F32_DOT)
    _store_tile(DK + bh * T * DQK, offs_n, T, offs_dqk, DQK, dk * scale)
    _store_tile(DV_OUT + bh * T * DV, offs_n, T, offs_dv, DV, dv)


@triton.jit
def _flash_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, T, DQK, DV, qk_scale, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQK_P: tl.constexpr,
                         DV_P: tl.constexpr, F32_DOT: tl.constexpr):
    # One program: BLOCK_M queries; dQ_i = scale * sum_{j <= i} dS_ij k_j.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO = Q + bh * T * DQK, K + bh * T * DQK, V + bh * T * DV, DO + bh * T * DV
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk, offs_dv = tl.arange(0, DQK_P), tl.arange(0, DV_P)
    q = _load_tile(Q, offs_m, T, offs_dqk, DQK)
    do = _load_tile(DO, offs_m, T, offs_dv, DV)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, DQK_P], tl.float32)
    for start_n in range(0, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, offs_n, T, offs_dqk, DQK)
        v = _load_tile(V, offs_n, T, offs_dv, DV)
        p = tl.exp2(_dot(q, tl.trans(k), F32_DOT) * qk_scale - lse[:, None])
        p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
        ds = p * (_dot(do, tl.trans(v), F32_DOT) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, F32_DOT)
    _store_tile(DQ + bh * T * DQK, offs_m, T, offs_dqk, DQK, dq * scale)


if HAS_TRITON:  # autotuned twins of the kernels, used on CUDA; the interpreter gets one small config
    _tune = lambda kind, fn: triton.autotune(configs=_attn_configs(kind), key=["T", "DQK", "DV"])(fn)
    _flash_fwd_tuned = _tune("fwd", _flash_fwd_kernel)
    _flash_dkdv_tuned = _tune("dkdv", _flash_bwd_dkdv_kernel)
    _flash_dq_tuned = _tune("dq", _flash_bwd_dq_kernel)
_SMALL_ATTN = dict(BLOCK_M=16, BLOCK_N=16)


def _check_attn_inputs(q, k, v):
    _check(q.dim() == 4 and k.shape == q.shape,
           f"q and k must be [B, H, T, Dqk] alike, got {tuple(q.shape)}, {tuple(k.shape)}")
    _check(v.dim() == 4 and v.shape[:3] == q.shape[:3],
           f"v must be [B, H, T, Dv] with q's B, H, T, got {tuple(v.shape)}")
    _check(q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k.dtype == v.dtype,
           f"q, k, v must share one dtype, fp32 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.device == k.device == v.device, "q, k, v must be on one device")
    _check(all(t.is_contiguous() for t in (q, k, v)), "q, k, v must be contiguous (call .contiguous())")


def _launch_attn(tuned, kernel, grid_dim, args, q, v):
    """Launch one attention kernel: autotuned on CUDA, one small fixed config on the interpreter."""
    B, H, T, Dqk = q.shape
    f32_dot = q.dtype == torch.float32 or not q.is_cuda
    const = dict(DQK_P=_pow2(Dqk), DV_P=_pow2(v.shape[-1]), F32_DOT=f32_dot)
    if q.is_cuda:
        tuned[lambda META: (triton.cdiv(T, META[grid_dim]), B * H)](*args, **const)
    else:
        kernel[(triton.cdiv(T, _SMALL_ATTN[grid_dim]), B * H)](*args, **const, **_SMALL_ATTN)


def _flash_fwd(q, k, v, scale):
    _check_attn_inputs(q, k, v)
    _check_launchable(q)
    B, H, T, Dqk = q.shape
    Dv = v.shape[-1]
    o = torch.empty(B, H, T, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)     # log2 units
    rowmax = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # per query row, natural units
    _launch_attn(_flash_fwd_tuned, _flash_fwd_kernel, "BLOCK_M",
                 (q, k, v, o, lse, rowmax, T, Dqk, Dv, scale * LOG2E), q, v)
    return o, lse, rowmax.amax(dim=(0, 2))


def _flash_bwd(do, q, k, v, o, lse, scale):
    B, H, T, Dqk = q.shape
    Dv = v.shape[-1]
    delta = (do.float() * o.float()).sum(-1)  # D_i = dO_i . O_i = sum_j P_ij dP_ij: the softmax term
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (T, Dqk, Dv, scale * LOG2E, scale)
    _launch_attn(_flash_dkdv_tuned, _flash_bwd_dkdv_kernel, "BLOCK_N",
                 (q, k, v, do, lse, delta, dk, dv, *common), q, v)
    _launch_attn(_flash_dq_tuned, _flash_bwd_dq_kernel, "BLOCK_M",
                 (q, k, v, do, lse, delta, dq, *common), q, v)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse, max_logits = _flash_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(max_logits)
        return o, max_logits

    @staticmethod
    def backward(ctx, do, _dmax):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do.to(o.dtype).contiguous(), q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


def flash_attention(q, k, v, scale):
    """Causal Triton flash attention. Returns out [B, H, T, Dv] and max_logits [H] fp32 (no grad)."""
    return _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), float(scale))


def attention_with_max(q, k, v, scale):
    """Dispatcher for model.py: causal attention plus the per-head max logit QK-Clip needs.
    Torch path: SDPA for the output and a chunked no-grad pass for the max."""
    if _backend(q) == "triton":
        return flash_attention(q, k, v, scale)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out, causal_max_logits(q, k, scale)


# ======================================================================================
# 2. Decode attention over a KV cache, with per-key bias and per-sequence length
# ======================================================================================

def decode_attention_reference(q, k, v, bias, lengths, scale, return_logits=False):
    """q: [B, H, Dqk], k: [B, H, S, Dqk], v: [B, H, S, Dv], bias: [B, H, S] fp32, lengths: [B].
    out = softmax(q.k * scale + bias) v over the slots n < lengths[b]; a sequence with no usable
    slot (length 0, or every bias -inf) gets zeros. logits [B, H, S] fp32: q.k * scale without the
    bias, -inf at the slots n >= lengths[b]. Slots past the length are never read (may hold NaN)."""
    S = k.shape[2]
    valid = (torch.arange(S, device=k.device) < lengths[:, None].to(k.device))[:, None, :]  # [B, 1, S]
    logits = torch.einsum("bhd,bhnd->bhn", q.float(), k.float()) * scale
    logits = logits.masked_fill(~valid, float("-inf"))
    s = (logits + bias).masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)              # all masked: avoid -inf - -inf
    w = torch.exp(s - m)                                                 # [B, H, S]
    denom = w.sum(-1, keepdim=True)
    vf = v.float().masked_fill(~valid[..., None], 0.0)
    out = (torch.einsum("bhn,bhnd->bhd", w, vf) / torch.where(denom > 0, denom, 1.0)).to(q.dtype)
    return (out, logits) if return_logits else out


@triton.jit
def _decode_split_kernel(Q, K, V, BIAS, LENGTHS, LOGITS, PART_M, PART_L, PART_ACC,
                         H, S, DQK, DV, scale, CHUNK, N_SPLITS,
                         BLOCK_N: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
                         RETURN_LOGITS: tl.constexpr):
    # One program: keys [split * CHUNK, split * CHUNK + CHUNK) of one (batch, head). One query, so
    # the products are elementwise multiplies and sums, not tl.dot (memory bound anyway).
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * CHUNK
    hi = tl.minimum(tl.minimum(lo + CHUNK, S), tl.load(LENGTHS + bh // H))  # slots >= length: never read
    offs_dqk, offs_dv = tl.arange(0, DQK_P), tl.arange(0, DV_P)
    q = tl.load(Q + bh * DQK + offs_dqk, mask=offs_dqk < DQK, other=0.0).to(tl.float32)
    K, V = K + bh * S * DQK, V + bh * S * DV
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([DV_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K, offs_n, hi, offs_dqk, DQK).to(tl.float32)
        logit = tl.sum(k * q[None, :], 1) * scale                         # [BLOCK_N]
        if RETURN_LOGITS:
            tl.store(LOGITS + bh * S + offs_n, logit, mask=offs_n < hi)
        s = logit + tl.load(BIAS + bh * S + offs_n, mask=offs_n < hi, other=0.0)
        s = tl.where(offs_n < hi, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exps 0, not NaN
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use)
        v = _load_tile(V, offs_n, hi, offs_dv, DV).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    part = bh * N_SPLITS + split
    tl.store(PART_M + part, m_i)
    tl.store(PART_L + part, l_i)
    tl.store(PART_ACC + part * DV + offs_dv, acc, mask=offs_dv < DV)


@triton.jit
def _decode_combine_kernel(PART_M, PART_L, PART_ACC, O, DV, N_SPLITS,
                           SPLITS_P: tl.constexpr, DV_P: tl.constexpr):
    # out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,  M = max_s m_s
    bh = tl.program_id(0).to(tl.int64)
    offs_s, offs_dv = tl.arange(0, SPLITS_P), tl.arange(0, DV_P)
    m = tl.load(PART_M + bh * N_SPLITS + offs_s, mask=offs_s < N_SPLITS, other=float("-inf"))
    l = tl.load(PART_L + bh * N_SPLITS + offs_s, mask=offs_s < N_SPLITS, other=0.0)
    acc = _load_tile(PART_ACC + bh * N_SPLITS * DV, offs_s, N_SPLITS, offs_dv, DV)  # [SPLITS_P, DV_P]
    m_max = tl.max(m, 0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))         # empty splits weigh 0
    denom = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)  # nothing visible: zeros
    tl.store(O + bh * DV + offs_dv, out.to(O.dtype.element_ty), mask=offs_dv < DV)


def decode_attention(q, k, v, bias, lengths, scale, return_logits=False, chunk=None):
    """Triton flash-decoding; same contract as decode_attention_reference. `chunk` = keys per
    program (a multiple of the key block); by default enough programs to fill the GPU."""
    _check(q.dim() == 3 and k.dim() == 4 and k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[2],
           f"q must be [B, H, Dqk] and k [B, H, S, Dqk], got {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, S, Dqk = k.shape
    _check(v.dim() == 4 and v.shape[:3] == k.shape[:3], f"v must be [B, H, S, Dv], got {tuple(v.shape)}")
    _check(bias.shape == (B, H, S) and bias.dtype == torch.float32,
           f"bias must be [B, H, S] fp32, got {tuple(bias.shape)} {bias.dtype}")
    _check(lengths.shape == (B,) and not lengths.is_floating_point(),
           f"lengths must be [B] integers, got {tuple(lengths.shape)} {lengths.dtype}")
    _check(q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k.dtype == v.dtype,
           f"q, k, v must share one dtype, fp32 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(all(t.device == q.device for t in (k, v, bias, lengths)), "all inputs must be on one device")
    _check(all(t.is_contiguous() for t in (q, k, v, bias)),
           "q, k, v, bias must be contiguous (call .contiguous())")
    _check_launchable(q)
    Dv = v.shape[-1]
    block_n = 64 if q.is_cuda else 16
    if chunk is None:  # about four programs per SM, never fewer keys than one block per program
        programs = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        splits = max(1, min(triton.cdiv(programs, B * H), triton.cdiv(S, block_n)))
        chunk = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    _check(chunk > 0 and chunk % block_n == 0, f"chunk must be a positive multiple of {block_n}: {chunk}")
    n_splits = triton.cdiv(S, chunk)
    part_m = torch.empty(B * H * n_splits, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B * H * n_splits, Dv, device=q.device, dtype=torch.float32)
    logits = torch.full((B, H, S), float("-inf"), device=q.device) if return_logits else part_m  # dummy
    _decode_split_kernel[(B * H, n_splits)](
        q, k, v, bias, lengths.to(torch.int32), logits, part_m, part_l, part_acc,
        H, S, Dqk, Dv, scale, chunk, n_splits,
        BLOCK_N=block_n, DQK_P=_pow2(Dqk), DV_P=_pow2(Dv), RETURN_LOGITS=return_logits)
    out = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    _decode_combine_kernel[(B * H,)](part_m, part_l, part_acc, out, Dv, n_splits,
                                     SPLITS_P=_pow2(n_splits), DV_P=_pow2(Dv))
    return (out, logits) if return_logits else out


def decode_attention_auto(q, k, v, bias, lengths, scale, return_logits=False):
    """Dispatcher for keepkv.py / generation: Triton on CUDA, the torch reference elsewhere."""
    if _backend(q) == "triton":
        q, k, v, bias = (t.contiguous() for t in (q, k, v, bias))
        return decode_attention(q, k, v, bias, lengths, scale, return_logits=return_logits)
    return decode_attention_reference(q, k, v, bias, lengths, scale, return_logits=return_logits)


# ======================================================================================
# 3. Symmetric product A = X X^T (upper-triangle tiles only)
# ======================================================================================

def sym_matmul_reference(X):
    """X: [n, m] or [E, n, m] -> X @ X.mT ([n, n] or [E, n, n])."""
    return X @ X.mT


@triton.jit
def _sym_matmul_kernel(X, C, n, m, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr):
    # Program (i, j, e) computes tile (i, j) of C_e = X_e X_e^T; tiles below the diagonal are the
    # mirrors of tiles above it, so those programs exit at once.
    pid_i, pid_j = tl.program_id(0), tl.program_id(1)
    if pid_i > pid_j:
        return
    e = tl.program_id(2).to(tl.int64)
    X, C = X + e * n * m, C + e * n * n
    offs_i = pid_i * BLOCK + tl.arange(0, BLOCK)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k0 in range(0, m, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _load_tile(X, offs_i, n, offs_k, m)
        b = _load_tile(X, offs_j, n, offs_k, m)
        acc += _dot(a, tl.trans(b), F32_DOT)
    c = acc.to(C.dtype.element_ty)
    _store_tile(C, offs_i, n, offs_j, n, c)                  # tile (i, j)
    if pid_i < pid_j:
        _store_tile(C, offs_j, n, offs_i, n, tl.trans(c))    # its mirror (j, i)


def _sym_configs():
    return [triton.Config({"BLOCK": b, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for b, bk, w, s in [(128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 4, 4), (64, 64, 4, 4)]]


if HAS_TRITON:
    _sym_matmul_tuned = triton.autotune(configs=_sym_configs(), key=["n", "m"])(_sym_matmul_kernel)


def sym_matmul(X):
    """X @ X.mT for X [n, m] or [E, n, m] with the Triton kernel (half the tiles)."""
    _check(X.dim() in (2, 3), f"X must be [n, m] or [E, n, m], got {tuple(X.shape)}")
    _check(X.dtype in (torch.float32, torch.bfloat16), f"X must be fp32 or bf16, got {X.dtype}")
    _check(X.is_contiguous(), "X must be contiguous (call .contiguous())")
    _check_launchable(X)
    X3 = X if X.dim() == 3 else X[None]
    E, n, m = X3.shape
    C = torch.empty(E, n, n, device=X.device, dtype=X.dtype)
    f32 = X.dtype == torch.float32 or not X.is_cuda
    if X.is_cuda:
        grid = lambda META: (triton.cdiv(n, META["BLOCK"]), triton.cdiv(n, META["BLOCK"]), E)
        _sym_matmul_tuned[grid](X3, C, n, m, F32_DOT=f32)
    else:
        grid = (triton.cdiv(n, 16), triton.cdiv(n, 16), E)
        _sym_matmul_kernel[grid](X3, C, n, m, BLOCK=16, BLOCK_K=16, F32_DOT=f32)
    return C if X.dim() == 3 else C[0]


def sym_matmul_auto(X):
    """Dispatcher for muonclip.py's Newton-Schulz: Triton on CUDA, X @ X.mT elsewhere."""
    return sym_matmul(X.contiguous()) if _backend(X) == "triton" else sym_matmul_reference(X)


# ----------------------------------------------------------------------------- 4. grouped GEMM (MoE)
# Not a Triton kernel: the MoE's expert matmuls (model.py, MoE.experts_grouped) run as one
# torch._grouped_mm over rows sorted by expert. The reference path is the fp64 branch: one weight
# matrix gathered per row, a batched matmul; tests/test_model.py compares the grouped MoE against
# MoE.experts_loop, a plain loop over experts.
# torch._grouped_mm runs fp32 on the CPU in eager mode, but its compile-time shape check only
# admits bf16. Wrapping it in a custom op (with its own shape function and backward) lets the
# compiled MoE call it as an opaque node, in any dtype, with no graph break.
@torch.library.custom_op("nanok2::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group; group e (rows offs[e-1]:offs[e]) is multiplied by w[e].
    x [R, I], w [E, I, O], offs [E] int32 cumulative row ends -> [R, O]."""
    if x.dtype == torch.float64:  # not supported by _grouped_mm: per-row weights (tests only)
        return torch.bmm(x[:, None, :], w[_group_of_rows(offs, x.shape[0])])[:, 0]
    return torch._grouped_mm(x, w, offs=offs)


def _group_of_rows(offs, n):
    return torch.searchsorted(offs, torch.arange(n, device=offs.device, dtype=offs.dtype), right=True)


grouped_mm.register_fake(lambda x, w, offs: x.new_empty(x.shape[0], w.shape[-1]))


@torch.library.custom_op("nanok2::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-group x_e^T @ grad_e: the weight gradient of grouped_mm. -> [E, I, O]."""
    if x.dtype == torch.float64:
        out = x.new_zeros(offs.shape[0], x.shape[1], grad.shape[1])
        return out.index_add_(0, _group_of_rows(offs, x.shape[0]), x[:, :, None] * grad[:, None, :])
    return torch._grouped_mm(x.t(), grad, offs=offs)


grouped_mm_wgrad.register_fake(lambda x, grad, offs: x.new_empty(offs.shape[0], x.shape[1], grad.shape[1]))


def _grouped_mm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    gx = grouped_mm(grad, w.transpose(-2, -1).contiguous(), offs) if ctx.needs_input_grad[0] else None
    gw = grouped_mm_wgrad(x, grad, offs) if ctx.needs_input_grad[1] else None
    return gx, gw, None


grouped_mm.register_autograd(_grouped_mm_backward,
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))
