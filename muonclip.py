"""MuonClip: Muon for the hidden matrices, AdamW for the rest, and QK-Clip after every step.

Sources: the Kimi K2 report (arXiv 2507.20534), Algorithm 1: MuonClip = Muon with weight decay and
the RMS-matched update scale, then per-head QK-Clip. Moonlight, "Muon is Scalable for LLM
Training" (arXiv 2502.16982): the 0.2 sqrt(max(n, m)) update scale and decoupled weight decay.
Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (blog post, 2024,
kellerjordan.github.io/posts/muon): the Newton-Schulz coefficients and Nesterov momentum (K2's
Algorithm 1 writes plain momentum, `nesterov=False` here).

Read top to bottom:
  1. Newton-Schulz 5 (`zeropower_ns5`): pushes the singular values of a matrix towards 1 (all but
     the very smallest end in [0.68, 1.21]), so an update moves all directions of a weight matrix
     by about the same amount.
  2. The Muon update (`muon_update`): Nesterov momentum, orthogonalise, scale so the update has
     about the RMS AdamW's updates have (0.2), which lets Muon reuse AdamW's learning rate and decay.
     `orthogonal_updates` orthogonalises and scales many tensors at once: all matrices of one
     shape in one batched call.
  3. The step math as pure functions over lists of tensors (`muon_step_`, batched, and
     `muon_step_per_matrix_`, the literal loop it is tested against; `adamw_step_`). The
     learning rate and weight decay come in as 0-d tensors: a compiled step sees a new value, not
     a new constant, so changing the schedule never recompiles.
  4. The parameter split (`split_params`): which tensor gets Muon and which AdamW.
  5. QK-Clip (`qk_clip_`): rescale the query/key rows of every head whose attention logits passed
     tau, so the logits of that head shrink by exactly tau / S_max.
  6. Muon under FSDP2 (`muon_step_sharded_`): Newton-Schulz needs whole matrices, but FSDP2 gives
     each rank a block of rows. Whole matrices are dealt out to the ranks with all_to_all, each
     rank orthogonalises its share, and the results go back the same way.
  7. `MuonClip`, the thin optimizer class over 1-6, and `build_optimizer`, what train.py calls.
Shapes: H heads, E experts, n x m a matrix (rows x cols).
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from kernels import sym_matmul_auto
from model import MLA

NS_COEFFS = (3.4445, -4.7750, 2.0315)   # quintic Newton-Schulz (a, b, c), Keller Jordan's Muon
RMS_MATCH = 0.2                         # Moonlight: 0.2 * sqrt(max(n, m)) gives AdamW's update RMS
# Most elements one batched NS call takes (orthogonal_updates splits larger groups). A CPU wants a
# call's matrices in its L2 cache (2^18 fp32 = 1 MiB; larger calls measured slower, RESULTS.md);
# a GPU wants big calls, and 2^26 only bounds one call's temporaries (a few hundred MiB in bf16).
NS_BATCH_NUMEL = {"cpu": 2 ** 18, "cuda": 2 ** 26}


# ----------------------------------------------------------------------------- 1. Newton-Schulz

def gram(X: Tensor) -> Tensor:
    """X @ X^T over the last two dims. The one product a symmetric-output kernel (upper-triangle
    tiles only, half the FLOPs) can replace: pass it as `sym_matmul` to zeropower_ns5."""
    return sym_matmul_auto(X)  # Triton upper-triangle kernel on CUDA, X @ X.mT elsewhere


def zeropower_ns5(G: Tensor, steps: int = 5, eps: float = 1e-7, *, coeffs=NS_COEFFS,
                  dtype: torch.dtype | None = None, sym_matmul=gram) -> Tensor:
    """Approximately orthogonalise G [..., n, m] (batched over leading dims): U S V^T -> U S' V^T.

    Each singular value of G / ||G||_F, s = sigma / ||G||_F <= 1, goes through the quintic
    p(s) = a s + b s^3 + c s^5 once per step: S' = p(p(p(p(p(s))))). The quintic is tuned for
    speed (slope a = 3.4 at 0), not to converge to 1. In exact arithmetic every s >= 1.6e-3 ends in
    [0.68, 1.21], but smaller ones stay small, near a^5 s = 485 s (1e-3 -> 0.47, 1e-4 -> 0.05);
    tests/test_muonclip.py measures both.

    Runs in bf16 on the GPU (NS is robust to it), at least fp32 elsewhere; returns G's dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"zeropower_ns5 needs a matrix (or a batch of them), got shape {tuple(G.shape)}")
    a, b, c = coeffs
    wide_dtype = torch.promote_types(G.dtype, torch.float32)   # fp64 stays fp64 (exactness tests)
    dtype = dtype or (torch.bfloat16 if G.is_cuda else wide_dtype)
    X = G.to(wide_dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide orientation: X X^T is then the smaller (min(n, m))^2 Gram matrix
        X = X.mT
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])        # [batch, n, m]: any leading dims become one batch
    # Frobenius norm >= spectral norm, so after this every singular value is <= 1: inside the
    # interval where the iteration is designed to work.
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) + eps)).to(dtype)
    for _ in range(steps):
        A = sym_matmul(X)                             # [batch, n, n] symmetric
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)   # b A + c A A, one call, no temporaries
        X = torch.baddbmm(X, B, X, beta=a)            # a X + B X: each s -> a s + b s^3 + c s^5
    X = X.reshape(shape)
    if tall:
        X = X.mT
    return X.to(G.dtype)


# ----------------------------------------------------------------------------- 2. the Muon update

def muon_scale(shape) -> float:
    """0.2 * sqrt(max(n, m)): an orthogonal n x m matrix has RMS 1/sqrt(max(n, m)), so the
    scaled update has RMS ~0.2, like AdamW's (Moonlight). Per matrix: for [E, n, m] per expert."""
    return RMS_MATCH * math.sqrt(max(shape[-2], shape[-1]))


def momentum_(grad: Tensor, momentum_buf: Tensor, beta: float, nesterov: bool) -> Tensor:
    """M = beta M + G (in place); returns U = G + beta M (Nesterov) or M. Elementwise: a block
    of rows gives that block of U (what each rank does under FSDP2, section 6)."""
    momentum_buf.mul_(beta).add_(grad)
    return grad.add(momentum_buf, alpha=beta) if nesterov else momentum_buf


def orthogonal_update(u: Tensor, ns_steps: int = 5, sym_matmul=gram) -> Tensor:
    """NS5(U) * 0.2 sqrt(max(n, m)): needs whole matrices (or whole experts of a stack)."""
    return zeropower_ns5(u, ns_steps, sym_matmul=sym_matmul) * muon_scale(u.shape)


def muon_update(grad: Tensor, momentum_buf: Tensor, beta: float = 0.95, nesterov: bool = True,
                ns_steps: int = 5, sym_matmul=gram) -> Tensor:
    """One Muon direction, without the learning rate. Updates `momentum_buf` in place.

        M = beta M + G;  U = G + beta M (Nesterov) or M;  O = NS5(U) * 0.2 sqrt(max(n, m))

    A [E, n, m] expert stack is orthogonalised per expert (batched), never as one flat matrix.
    """
    return orthogonal_update(momentum_(grad, momentum_buf, beta, nesterov), ns_steps, sym_matmul)


def ns_shape(u: Tensor) -> tuple[int, int]:
    """(rows, cols) of the matrices NS5 works on for u: the wide orientation (it transposes a
    tall matrix, and NS5(X^T) = NS5(X)^T), per expert for an [E, n, m] stack."""
    n, m = u.shape[-2:]
    return min(n, m), max(n, m)


def orthogonal_updates(us: list[Tensor], ns_steps: int = 5, sym_matmul=gram,
                       max_numel: int | None = None) -> list[Tensor]:
    """[orthogonal_update(u) for u in us], the same numbers, with every matrix of one ns_shape in
    ONE batched NS5 call: all layers' wq, all experts of all layers (a [E, F, D] stack gives E
    matrices), tall ones transposed to join the wide ones of their shape.

    Why: the tiny preset has 40 Muon tensors in 7 NS shapes. One at a time, 5 NS steps are 600
    small matmuls, and one 96 x 192 matmul split over 2 threads spends much of its time waiting;
    in a bmm each thread takes whole matrices (`bench.py optim --share` measures it). On a GPU,
    fewer and larger launches. Groups are keyed in order of first appearance: the same on
    every rank. A group of more than max_numel elements (default NS_BATCH_NUMEL for the device)
    is split over several calls.
    """
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(us):
        groups.setdefault((*ns_shape(u), u.dtype, u.device), []).append(i)
    out: list[Tensor] = [None] * len(us)
    for (n, m, _, device), idx in groups.items():
        per_call = max(1, (max_numel or NS_BATCH_NUMEL.get(device.type, 2 ** 26)) // (n * m))
        tall = [us[i].size(-2) > us[i].size(-1) for i in idx]
        wide = [us[i].mT if t else us[i] for i, t in zip(idx, tall)]
        stack = torch.cat([w.reshape(-1, n, m) for w in wide])            # [matrices, n, m]
        o = torch.cat([zeropower_ns5(x, ns_steps, sym_matmul=sym_matmul)
                       for x in stack.split(per_call)]) * muon_scale((n, m))
        for i, t, w, oi in zip(idx, tall, wide, o.split([w.numel() // (n * m) for w in wide])):
            oi = oi.view(w.shape)
            out[i] = oi.mT if t else oi                                   # back to u's orientation
    return out


# ----------------------------------------------------------------------------- 3. step math

def apply_update_(p: Tensor, u: Tensor, lr: Tensor, weight_decay: Tensor) -> Tensor:
    """W -= lr * (U + wd * W), the decay on the weight before this update (decoupled). Returns
    the sum of squares of the applied update (lr included, decay excluded), for the logged RMS."""
    p.mul_(1 - lr * weight_decay)
    p.addcmul_(u.to(p.dtype), lr, value=-1)        # p -= lr * u, with no temporary as big as p
    return lr.square() * u.float().square().sum()


def muon_step_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], lr: Tensor,
               weight_decay: Tensor, beta: float = 0.95, nesterov: bool = True,
               ns_steps: int = 5) -> Tensor:
    """W -= lr * (muon_update(G) + wd * W) for every parameter, all matrices of one shape
    orthogonalised together (orthogonal_updates). lr, weight_decay: 0-d tensors.
    Returns the sum of squares of the applied updates (lr included, decay excluded)."""
    us = [momentum_(g, buf, beta, nesterov) for g, buf in zip(grads, bufs)]
    sq = torch.zeros((), device=lr.device)
    for p, o in zip(params, orthogonal_updates(us, ns_steps)):
        sq = sq + apply_update_(p, o, lr, weight_decay)
    return sq


def muon_step_per_matrix_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], lr: Tensor,
                          weight_decay: Tensor, beta: float = 0.95, nesterov: bool = True,
                          ns_steps: int = 5) -> Tensor:
    """muon_step_ one parameter at a time, the definition read literally. Kept as the reference
    the batched step is tested against (and timed against: `bench.py optim --share`)."""
    sq = torch.zeros((), device=lr.device)
    for p, g, buf in zip(params, grads, bufs):
        sq = sq + apply_update_(p, muon_update(g, buf, beta, nesterov, ns_steps), lr, weight_decay)
    return sq


def adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: Tensor, weight_decay: Tensor,
                betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> Tensor:
    """Plain AdamW with decoupled decay (same math as torch.optim.AdamW). Returns the sum of
    squares of the applied updates (lr included, decay excluded)."""
    beta1, beta2 = betas
    sq = torch.zeros((), device=lr.device)
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t += 1
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        # u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps), in ONE temporary: the
        # embedding and head are the largest tensors of a small model, and each extra pass over
        # them (or a fresh allocation of their size) costs more than the arithmetic.
        u = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
        u.reciprocal_().mul_(m).div_(1 - beta1 ** t)
        sq = sq + apply_update_(p, u, lr, weight_decay)
    return sq


# ----------------------------------------------------------------------------- 4. the split

# The rule, checked for every trainable parameter when the optimizer is built:
#   AdamW: the token embedding (`embed.weight`: a lookup table, each row sees only its own token)
#          and the LM head (`head.weight`: the output classifier), plus every 1-D norm gain
#          (`*norm.weight`) and bias (`*.bias`). Weight decay: on the matrices only, never on
#          1-D parameters (decay would pull norm gains towards 0), as the AdamW baseline does.
#   Muon:  every other 2-D weight [out, in] (attention projections, dense MLP, shared expert,
#          router gate) and every 3-D expert stack [E, out, in] (orthogonalised per expert).
#   Anything else (a 1-D tensor that is not a norm gain or bias, 0-D or 4-D+) is an error: a new
#   kind of parameter must be placed on purpose, not fall into a default group.
# The router's `gate.bias` is a buffer (set by the load-balancing rule), so no optimizer sees it.
ADAMW_MATRICES = ("embed.weight", "head.weight")


def param_kind(name: str, p: Tensor) -> str:
    if name in ADAMW_MATRICES:
        return "adamw"
    if p.ndim == 1 and (name.endswith("norm.weight") or name.endswith(".bias") or name == "bias"):
        return "adamw"
    if p.ndim in (2, 3):
        return "muon"
    raise ValueError(f"parameter {name!r} with shape {tuple(p.shape)} fits no optimizer group "
                     f"(rule in muonclip.py: embedding/head/norm gains/biases -> AdamW, other 2-D "
                     f"and 3-D [E, out, in] weights -> Muon); place it explicitly")


def split_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(muon, adamw) lists of (name, parameter), following the rule above. Frozen parameters
    (requires_grad False) are left out of both."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if param_kind(name, p) == "muon" else adamw).append((name, p))
    return muon, adamw


# ----------------------------------------------------------------------------- 5. QK-Clip

def qk_clip_factors(max_logits: Tensor, tau: float) -> Tensor:
    """gamma per head: tau / S_max where S_max > tau, exactly 1.0 elsewhere (-inf, NaN: 1.0)."""
    s = max_logits.float()
    return torch.where(s > tau, tau / s, torch.ones_like(s))


@torch.no_grad()
def scale_rows_(w: Tensor, factors: Tensor) -> None:
    """w[r, :] *= factors[r]. Under FSDP2, w is a DTensor holding a block of rows on each rank:
    the factor vector is split the same way (no communication) and each rank scales its rows."""
    factors = factors[:, None]
    if isinstance(w, DTensor):
        factors = distribute_tensor(factors, w.device_mesh, w.placements, src_data_rank=None).to_local()
        w = w.to_local()
    w.mul_(factors.to(w.dtype))


@torch.no_grad()
def qk_clip_(attn: MLA, gamma: Tensor) -> None:
    """Scale one MLA layer so that every logit of head h becomes gamma[h] times what it was.

    logit = q_nope . k_nope + q_rope . k_rope (times the softmax scale). q_nope comes from the
    W_qc rows, k_nope from the W_kc rows: both times sqrt(gamma). q_rope comes from the W_qr rows:
    times gamma. k_rope is one key shared by all heads (last rows of wkv_a), so it cannot carry a
    per-head factor and stays; so do the values (W_v rows) and the output projection.

    Done as one factor per output row (row r of wq/wq_b belongs to head r // (nope + rope)), which
    also applies unchanged to any block of rows, e.g. the shard of a row-sharded weight.
    Rows of unclipped heads are multiplied by exactly 1.0, so they stay bit-identical.
    """
    H, nope, rope, v = attn.n_heads, attn.nope, attn.rope, attn.v_dim
    g = gamma.to(attn.wkv_b.weight.device, torch.float32)[:, None]          # [H, 1]
    sg = g.sqrt()
    q_rows = torch.cat([sg.expand(H, nope), g.expand(H, rope)], dim=1).reshape(-1)   # [H*(nope+rope)]
    kv_rows = torch.cat([sg.expand(H, nope), torch.ones_like(g).expand(H, v)], dim=1).reshape(-1)
    wq = attn.wq.weight if hasattr(attn, "wq") else attn.wq_b.weight         # [H*(nope+rope), in]
    scale_rows_(wq, q_rows)
    scale_rows_(attn.wkv_b.weight, kv_rows)                                   # [H*(nope+v), kv_lora]


# ----------------------------------------------------------------------------- 6. Muon under FSDP2

def _local(t: Tensor) -> Tensor:
    """This rank's block of a DTensor (a view: in-place ops change the DTensor), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_rows(n: int, world: int) -> list[int]:
    """Rows of an n-row tensor on each rank under Shard(0): torch.chunk's split (ceil(n / world)
    per rank, the last ranks get what is left, possibly nothing)."""
    per = -(-n // world)
    return [max(0, min(per, n - r * per)) for r in range(world)]


@torch.no_grad()
def muon_step_sharded_(params: list[DTensor], grads: list[DTensor], bufs: list[DTensor], lr: Tensor,
                       weight_decay: Tensor, beta: float = 0.95, nesterov: bool = True,
                       ns_steps: int = 5) -> Tensor:
    """muon_step_ for FSDP2 parameters (DTensors sharded on dim 0): the same update, bit for bit
    the same Newton-Schulz input, without any rank orthogonalising every matrix.

    - Momentum and Nesterov are elementwise: each rank updates its own rows.
    - A 3-D expert stack [E, n, m] is sharded on E, so each rank holds whole experts and
      orthogonalises them where they are (all stacks of one shape in one batched call): no
      communication at all.
    - A 2-D matrix is sharded by rows. Matrices are dealt out W at a time (largest first, so each
      round's work is even): in a round, rank j owns matrix j. One all_to_all sends every rank's
      rows of matrix j to rank j, which orthogonalises the whole matrix; a second all_to_all sends
      each rank its rows of the result. Compute per rank ~ 1/W of the total, traffic ~ 2x the
      matrices' size, versus all-gathering every matrix everywhere (W x the compute).
    Returns this rank's sum of squared applied updates (the caller all-reduces it).
    """
    group = params[0].device_mesh.get_group()  # the ranks the parameters are sharded over
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    us = [momentum_(_local(g), _local(buf), beta, nesterov) for g, buf in zip(grads, bufs)]
    stacks = [i for i, u in enumerate(us) if u.ndim == 3]   # whole experts: batched, in place
    updates = dict(zip(stacks, orthogonal_updates([us[i] for i in stacks], ns_steps)))
    matrices = [(i, u) for i, u in enumerate(us) if u.ndim != 3]
    matrices.sort(key=lambda iu: -params[iu[0]].numel())  # same order on every rank
    for start in range(0, len(matrices), world):
        round_ = matrices[start:start + world]
        mine = round_[rank] if rank < len(round_) else None
        # out: my rows of each matrix, to its owner. in: every rank's rows of the matrix I own.
        send_splits = [u.numel() for _, u in round_] + [0] * (world - len(round_))
        if mine is not None:
            n, m = params[mine[0]].shape
            recv_splits = [rows * m for rows in shard_rows(n, world)]
        else:
            recv_splits = [0] * world
        sample = round_[0][1]
        whole = sample.new_empty(sum(recv_splits))
        dist.all_to_all_single(whole, torch.cat([u.reshape(-1) for _, u in round_]),
                               recv_splits, send_splits, group=group)
        if mine is not None:
            o = orthogonal_update(whole.view(n, m), ns_steps).reshape(-1)
        else:
            o = sample.new_empty(0)
        back = sample.new_empty(sum(send_splits))
        dist.all_to_all_single(back, o.to(sample.dtype), send_splits, recv_splits, group=group)
        for (i, u), rows in zip(round_, back.split(send_splits[:len(round_)])):
            updates[i] = rows.view_as(u)
    sq = torch.zeros((), device=lr.device)
    for i, p in enumerate(params):
        sq = sq + apply_update_(_local(p), updates[i], lr, weight_decay)
    return sq


# ----------------------------------------------------------------------------- 7. the optimizer

def check_tau(tau: float | None) -> None:
    if tau is not None and not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"qk_clip_tau must be a positive number, got {tau}; "
                         f"use --no-qk-clip to turn the clip off")


class MuonClip(torch.optim.Optimizer):
    """Muon (hidden matrices) + AdamW (embedding, head, norms, biases) + QK-Clip.

    Param groups by "kind": "muon", then "adamw" twice: the embedding and head with weight decay,
    the 1-D norm gains and biases with weight_decay 0. Each is keyed "lr" and "weight_decay"
    (train.py sets group["lr"] from its schedule). Per step: `step()`, then
    `qk_clip(model.pop_max_logits())`.
    Internally lr and decay are copied into 0-d tensors each step (no recompile, no host sync).
    State holds tensors only: momentum for Muon; exp_avg, exp_avg_sq, step for AdamW.
    Under FSDP2 the parameters are DTensors and the same class works unchanged: Muon goes through
    `muon_step_sharded_` (section 6), AdamW runs on each rank's rows, and `qk_clip` scales the rows
    each rank holds. The caller passes max logits already all-reduced (MAX) over the ranks.
    """

    def __init__(self, model: nn.Module, lr: float = 2e-4, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 qk_clip_tau: float | None = 100.0, compile: bool = False, batched_ns: bool = True):
        if not lr >= 0 or not weight_decay >= 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr >= 0, weight_decay >= 0, 0 <= momentum < 1; "
                             f"got {lr}, {weight_decay}, {momentum}")
        check_tau(qk_clip_tau)
        muon, adamw = split_params(model)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=tuple(adamw_betas), eps=eps)
        adamw_1d = [(n, p) for n, p in adamw if p.ndim < 2]       # norm gains, biases: no decay
        adamw_2d = [(n, p) for n, p in adamw if p.ndim >= 2]      # embedding, head
        groups = [dict(params=ps, kind=kind, weight_decay=wd) for kind, ps, wd in (
            ("muon", muon, weight_decay), ("adamw", adamw_2d, weight_decay), ("adamw", adamw_1d, 0.0)) if ps]
        super().__init__(groups, defaults)
        self.qk_clip_tau = qk_clip_tau
        self.attn_layers = [m for m in model.modules() if isinstance(m, MLA)]
        self._muon_fn = torch.compile(muon_step_) if compile else muon_step_
        self.batched_ns = batched_ns   # False: muon_step_per_matrix_, the reference (eager, 1 process)
        self._adamw_fn = torch.compile(adamw_step_) if compile else adamw_step_
        self._hparams: dict[int, tuple[Tensor, Tensor]] = {}   # group index -> (lr, wd) 0-d tensors
        self._stats: dict = {}

    def _hparam_tensors(self, i: int, group: dict, device) -> tuple[Tensor, Tensor]:
        if i not in self._hparams:
            self._hparams[i] = (torch.zeros((), device=device), torch.zeros((), device=device))
        lr, wd = self._hparams[i]
        lr.fill_(group["lr"])
        wd.fill_(group["weight_decay"])
        return lr, wd

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stats = {}
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            sharded = isinstance(params[0], DTensor)   # FSDP2: each rank holds a block of rows
            lr, wd = self._hparam_tensors(i, group, _local(params[0]).device)
            numel = sum(p.numel() for p in params)  # a DTensor's numel is the whole tensor's
            if group["kind"] == "muon":
                bufs = [self._state(p, momentum_buffer=torch.zeros_like)["momentum_buffer"] for p in params]
                hp = (group["momentum"], group["nesterov"], group["ns_steps"])
                if sharded:
                    sq = muon_step_sharded_(params, grads, bufs, lr, wd, *hp)
                else:
                    muon_fn = self._muon_fn if self.batched_ns else muon_step_per_matrix_
                    sq = muon_fn(params, grads, bufs, lr, wd, *hp)
                key = "update_rms"
            else:
                st = [self._state(p, exp_avg=torch.zeros_like, exp_avg_sq=torch.zeros_like,
                                  step=lambda q: torch.zeros((), device=_local(q).device)) for p in params]
                # elementwise math: on shards it is the same update, each rank on its own rows
                sq = self._adamw_fn([_local(p) for p in params], [_local(g) for g in grads],
                                    [_local(s["exp_avg"]) for s in st], [_local(s["exp_avg_sq"]) for s in st],
                                    [s["step"] for s in st], lr, wd, group["betas"], group["eps"])
                key = "adamw_update_rms"
            prev_sq, prev_n = stats.get(key, (0.0, 0))  # (two AdamW groups: one RMS over both)
            stats[key] = (prev_sq + sq, prev_n + numel)
        first = self.param_groups[0]["params"][0]
        if stats and isinstance(first, DTensor):
            # each rank summed the squares of its own rows: one all-reduce gives the totals
            sqs = torch.stack([sq for sq, _ in stats.values()])
            dist.all_reduce(sqs, group=first.device_mesh.get_group())
            stats = {k: (sq, n) for (k, (_, n)), sq in zip(stats.items(), sqs)}
        self._stats = {k: (sq / n).sqrt() for k, (sq, n) in stats.items()}
        return loss

    def _state(self, p: Tensor, **init) -> dict:
        state = self.state[p]
        for key, make in init.items():
            if key not in state:
                state[key] = make(p)
        return state

    @property
    def last_stats(self) -> dict:
        """Stats of the last step (and clip) as Python numbers: update_rms (Muon group, lr
        included), adamw_update_rms, max_logit, heads_clipped. Reading them syncs the device."""
        return {k: (v.item() if isinstance(v, Tensor) else v) for k, v in self._stats.items()}

    @torch.no_grad()
    def qk_clip(self, max_logits: Tensor) -> dict:
        """Apply QK-Clip from the per-head max logits of this step's forwards ([n_layers, n_heads],
        from model.pop_max_logits()). Momentum is not touched. With qk_clip_tau None this only
        reports. Returns {"max_logit": max over heads before clipping, "heads_clipped": count}."""
        if max_logits.shape[0] != len(self.attn_layers):
            raise ValueError(f"max_logits has {max_logits.shape[0]} rows, the model has "
                             f"{len(self.attn_layers)} attention layers")
        clipped = 0
        if self.qk_clip_tau is not None:
            gamma = qk_clip_factors(max_logits, self.qk_clip_tau)      # [L, H]
            for attn, g in zip(self.attn_layers, gamma):
                qk_clip_(attn, g)
            clipped = (gamma < 1).sum()
        out = {"max_logit": float(max_logits.max()), "heads_clipped": int(clipped)}
        self._stats.update(out)
        return out


# each optimizer's peak lr when none is given: the best of the sweep in `python bench.py optim` (tiny preset)
DEFAULT_LR = {"muonclip": 3e-3, "adamw": 3e-3}
OPTIMIZERS = tuple(DEFAULT_LR)


def build_optimizer(model: nn.Module, name: str, lr: float | None, weight_decay: float,
                    qk_clip_tau: float | None) -> torch.optim.Optimizer:
    """"muonclip" -> MuonClip. "adamw" -> the baseline torch.optim.AdamW (betas 0.9/0.95, eps
    1e-8), whose decay rule is nanoGPT's and MuonClip's: every parameter with >= 2 dims (all
    matrices, expert stacks, embedding, head) is decayed, 1-D ones (norm gains, biases) are not.
    lr None: DEFAULT_LR's. tau is checked for both names (it is ignored by AdamW)."""
    check_tau(qk_clip_tau)
    lr = DEFAULT_LR.get(name) if lr is None else lr
    if name == "muonclip":
        return MuonClip(model, lr=lr, weight_decay=weight_decay, qk_clip_tau=qk_clip_tau)
    if name == "adamw":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [dict(params=[(n, p) for n, p in named if p.ndim >= 2], weight_decay=weight_decay),
                  dict(params=[(n, p) for n, p in named if p.ndim < 2], weight_decay=0.0)]
        groups = [g for g in groups if g["params"]]
        on_fused_device = all(p.device.type in ("cuda", "cpu") for _, p in named)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                                 **({"fused": True} if on_fused_device else {"foreach": True}))
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def describe(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer and its main settings in one line (train.py prints it at startup), e.g.
    "MuonClip lr 3e-3, tau 100, wd 0.1" or "AdamW lr 3e-3, betas 0.9/0.95, wd 0.1"."""
    g = optimizer.param_groups[0]  # the decayed matrices: lr and wd as given to build_optimizer
    lr, wd = _short(g["lr"]), f"{g['weight_decay']:g}"
    if isinstance(optimizer, MuonClip):
        tau = "off (plain Muon)" if optimizer.qk_clip_tau is None else f"{optimizer.qk_clip_tau:g}"
        return f"MuonClip lr {lr}, tau {tau}, wd {wd}"
    b1, b2 = g["betas"]
    return f"{type(optimizer).__name__} lr {lr}, betas {b1:g}/{b2:g}, wd {wd}"


def _short(x: float) -> str:
    """3e-3 rather than 0.003 or 3.000000e-03: how learning rates are written."""
    mantissa, exp = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
