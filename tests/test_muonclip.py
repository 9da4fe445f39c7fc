"""Tests for muonclip.py: Newton-Schulz, the Muon step against torch.optim.Muon, the parameter
split, QK-Clip exactness on a tiny MLA model, state round trip. Small shapes: runs in seconds."""

import io
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import RMSNorm, build_model, get_args  # noqa: E402
import muonclip  # noqa: E402
from muonclip import (MuonClip, build_optimizer, muon_scale, muon_step_, muon_update,  # noqa: E402
                      split_params, zeropower_ns5)

TINY = dict(dim=64, n_layers=2, n_heads=2, n_routed_experts=4, n_activated_experts=2,
            moe_inter_dim=32, inter_dim=96, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, vocab_size=256, max_seq_len=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny_model(q_lora_rank=0, seed=0):
    return build_model(get_args("tiny", q_lora_rank=q_lora_rank, **TINY), seed=seed)


def random_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


# ----------------------------------------------------------------------------- Newton-Schulz

@pytest.mark.parametrize("shape", [(48, 128), (128, 48), (64, 64), (256, 96)])
def test_ns5_singular_values_in_band(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    O = zeropower_ns5(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    s = torch.linalg.svdvals(O)
    # NS5's quintic is tuned to be fast, not to converge: singular values land in about
    # [0.7, 1.2]. (A square Gaussian has singular values near 0 that 5 steps cannot lift that
    # far: exempt the 2 smallest there. Gradients are rarely square and full rank. Where exactly
    # the band starts: test_ns5_follows_the_scalar_quintic.)
    lo = s[:-2] if shape[0] == shape[1] else s
    assert lo.min() > 0.65 and s.max() < 1.2, (s.min(), s.max())


def ns5_scalar(s: float, steps: int = 5) -> float:
    """What NS5 does to one singular value of G / ||G||_F, on plain Python floats (the
    coefficients typed again here, from Keller Jordan's Muon, not imported)."""
    for _ in range(steps):
        s = 3.4445 * s - 4.7750 * s ** 3 + 2.0315 * s ** 5
    return s


@pytest.mark.parametrize("tall", [False, True])
def test_ns5_follows_the_scalar_quintic(tall):
    """zeropower_ns5 maps each singular value through the scalar quintic, and the band its
    docstring states holds exactly where it says: [0.68, 1.21] for s >= 1.6e-3, far below for less."""
    # s = sigma / ||G||_F; the grid's extremes sit near 4.1e-3 (1.2024) and 9.3e-3 (0.6818)
    s = [1e-4, 3e-4, 1e-3, 1.5e-3, 1.6e-3, 2e-3, 3e-3, 4.1e-3, 9.3e-3, 0.03, 0.1, 0.3, 0.5]
    s.append(math.sqrt(1 - sum(x * x for x in s)))  # sum s^2 = 1, so ||U diag(s) V^T||_F = 1
    n, m = len(s), 40
    g = torch.Generator().manual_seed(7)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]   # [m, n], V^T V = I
    G = 1000.0 * U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T      # 1000: eps is negligible
    O = zeropower_ns5(G.mT).mT if tall else zeropower_ns5(G)
    S_out = U.T @ O @ V                                     # diagonal: NS keeps the singular vectors
    got = torch.diagonal(S_out)
    torch.testing.assert_close(S_out - torch.diag(got), torch.zeros(n, n, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    expect = torch.tensor([ns5_scalar(x) for x in s], dtype=torch.float64)
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-12)
    for x, y in zip(s, got.tolist()):
        assert (0.68 <= y <= 1.21) == (x >= 1.6e-3), (x, y)
    assert got[0] < 0.05 and got[2] < 0.5           # s = 1e-4 -> 0.048, 1e-3 -> 0.47
    # the band over the whole range s in [1.6e-3, 1] (log grid), and how tight its edges are
    finals = [ns5_scalar(1.6e-3 ** (1 - i / 20000)) for i in range(20001)]
    assert 0.68 <= min(finals) and max(finals) <= 1.21, (min(finals), max(finals))
    assert max(finals) > 1.2 and min(finals) < 0.69 and ns5_scalar(1.5e-3) < 0.68


def test_ns5_rectangular_both_ways_and_scale_invariant():
    torch.manual_seed(1)
    G = torch.randn(40, 72)
    torch.testing.assert_close(zeropower_ns5(G.mT), zeropower_ns5(G).mT, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zeropower_ns5(1000 * G), zeropower_ns5(G), rtol=1e-4, atol=1e-5)
    assert zeropower_ns5(torch.zeros(8, 16)).abs().max() == 0  # eps: no NaN on a zero gradient


def test_ns5_batched_equals_per_matrix():
    torch.manual_seed(2)
    for shape in [(3, 4, 24, 40), (5, 40, 24)]:  # wide and tall stacks
        G = torch.randn(shape)
        batched = zeropower_ns5(G)
        flat = G.reshape(-1, *shape[-2:])
        each = torch.stack([zeropower_ns5(m) for m in flat]).reshape(shape)
        torch.testing.assert_close(batched, each, rtol=1e-5, atol=1e-5)


def test_ns5_sym_matmul_is_swappable():
    calls = []

    def counting_gram(X):
        calls.append(X.shape)
        return X @ X.mT

    G = torch.randn(2, 16, 24)
    torch.testing.assert_close(zeropower_ns5(G, sym_matmul=counting_gram), zeropower_ns5(G))
    assert calls == [torch.Size([2, 16, 24])] * 5  # wide orientation: X X^T is 16 x 16


def test_expert_stack_is_orthogonalised_per_expert():
    torch.manual_seed(3)
    E, F_, D = 4, 12, 20
    grad, buf = torch.randn(E, F_, D), torch.randn(E, F_, D)
    stacked = muon_update(grad, buf.clone())
    each = torch.stack([muon_update(grad[e], buf[e].clone()) for e in range(E)])
    torch.testing.assert_close(stacked, each, rtol=1e-5, atol=1e-5)
    assert muon_scale((E, F_, D)) == 0.2 * math.sqrt(D)  # per matrix, not over E * F


# ----------------------------------------------------------------------------- the Muon step

def _muon_vs_torch(nesterov_ref):
    torch.manual_seed(4)
    W0 = torch.randn(48, 80) * 0.02
    grads = [torch.randn(48, 80) for _ in range(3)]
    ref_p = nn.Parameter(W0.clone())
    ref = torch.optim.Muon([ref_p], lr=0.02, weight_decay=0.1, momentum=0.95,
                           nesterov=nesterov_ref, adjust_lr_fn="match_rms_adamw")
    lin = nn.Linear(80, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W0)
    opt = MuonClip(lin, lr=0.02, weight_decay=0.1, momentum=0.95, qk_clip_tau=None)
    for g in grads:  # three steps: momentum and Nesterov matter from the second on
        ref_p.grad, lin.weight.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    ours, theirs = lin.weight.detach() - W0, ref_p.detach() - W0
    return ((ours - theirs).norm() / theirs.norm()).item()


def test_muon_step_matches_torch_optim_muon():
    # torch.optim.Muon keeps an EMA momentum (a (1 - beta) multiple of ours: the same direction
    # after NS's normalisation) and runs NS in bf16; ours runs fp32 on the CPU. The bf16 rounding
    # is the whole difference: about 2%. Without Nesterov the difference is several times that.
    assert _muon_vs_torch(nesterov_ref=True) < 0.04
    assert _muon_vs_torch(nesterov_ref=False) > 0.1


def test_update_rms_is_0p2_lr():
    torch.manual_seed(5)
    lr = 0.01
    model = nn.ModuleDict({"a": nn.Linear(192, 64, bias=False), "b": nn.Linear(64, 192, bias=False),
                           "c": nn.Linear(128, 128, bias=False)})
    opt = MuonClip(model, lr=lr, weight_decay=0.0, qk_clip_tau=None)
    before = [p.detach().clone() for p in model.parameters()]
    random_grads(model, 0)
    opt.step()
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    rms = delta.square().mean().sqrt().item()
    assert rms == pytest.approx(opt.last_stats["update_rms"], rel=1e-4)
    # exactly 0.2 * lr * (RMS of NS5's singular values): the 0.2 sqrt(max(n, m)) scale is right.
    # (First step: the Nesterov direction is 1.95 G; NS is scale-free.)
    ps = list(model.parameters())
    sq = sum(max(p.shape) * torch.linalg.svdvals(zeropower_ns5(p.grad)).square().sum().item() for p in ps)
    expect = 0.2 * lr * math.sqrt(sq / sum(p.numel() for p in ps))
    assert rms == pytest.approx(expect, rel=1e-3)
    # NS5's singular values are ~0.7-1.13, not 1, so a Gaussian gradient gives 0.85-0.96 of
    # 0.2 lr (the larger the matrix, the closer to 1), never more than 0.2 lr
    assert 0.8 * 0.2 * lr < rms < 1.0 * 0.2 * lr, rms / (0.2 * lr)


def test_orthogonal_updates_equal_one_at_a_time():
    """The grouped call gives each tensor what orthogonal_update gives it alone (fp64): wide,
    tall and square matrices, stacks of both orientations, a stack with no experts (an FSDP2
    rank's empty shard), and an fp32 tensor of a shape also present in fp64 (its own group).
    Once in one call per shape, once with the 8 matrices of 12 x 20 split 2 per call."""
    g = torch.Generator().manual_seed(8)
    shapes = [(12, 20), (20, 12), (3, 12, 20), (2, 20, 12), (0, 12, 20), (16, 16), (5, 16, 16), (4, 20)]
    us = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    us.append(torch.randn(12, 20, generator=g))
    for max_numel in (None, 2 * 12 * 20):
        got = muonclip.orthogonal_updates(us, max_numel=max_numel)
        assert len(got) == len(us)
        for u, o in zip(us, got):
            assert o.shape == u.shape and o.dtype == u.dtype, u.shape
            tol = dict(rtol=1e-10, atol=1e-12) if u.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(o, muonclip.orthogonal_update(u), **tol,
                                       msg=lambda m: f"{u.shape}: {m}")


def _double_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_batched_step_equals_per_matrix_step(q_lora_rank):
    """MuonClip's batched step against muon_step_per_matrix_ (each parameter through muon_update
    on its own), in fp64, on a tiny model with every kind of Muon tensor (attention projections,
    dense MLP, expert stacks, the shared expert's tall w2, the router gate): 4 steps, so momentum
    carries over, with weight decay and an lr change midway."""
    models = [tiny_model(q_lora_rank).double() for _ in range(2)]
    w0 = [p.detach().clone() for p in models[0].parameters()]
    opts = [MuonClip(m, lr=0.02, weight_decay=0.1, qk_clip_tau=None, batched_ns=b)
            for m, b in zip(models, (True, False))]
    for step in range(4):
        for m, opt in zip(models, opts):
            _double_grads(m, step)
            if step == 2:
                for group in opt.param_groups:
                    group["lr"] = 0.01
            opt.step()
        rms = [opt.last_stats["update_rms"] for opt in opts]
        assert rms[0] == pytest.approx(rms[1], rel=1e-9) and rms[0] > 0  # (summed in fp32)
    batched, per_matrix = (dict(m.named_parameters()) for m in models)
    for (n, p), p0 in zip(batched.items(), w0):
        assert not torch.equal(p, p0), n  # every parameter moved
        torch.testing.assert_close(p, per_matrix[n], rtol=1e-12, atol=1e-14, msg=lambda m: f"{n}: {m}")
    for pa, pb in zip(opts[0].param_groups[0]["params"], opts[1].param_groups[0]["params"]):
        torch.testing.assert_close(opts[0].state[pa]["momentum_buffer"], opts[1].state[pb]["momentum_buffer"],
                                   rtol=1e-12, atol=1e-14)


def test_batched_step_is_one_ns_call_per_shape(monkeypatch):
    """The point of the batched step: one Newton-Schulz call per NS shape, every matrix of every
    layer in it (6 calls for 18 tensors here), not one per tensor."""
    model = tiny_model()
    muon = [p for _, p in split_params(model)[0]]
    calls, ns = [], muonclip.zeropower_ns5
    monkeypatch.setattr(muonclip, "zeropower_ns5", lambda G, *a, **k: calls.append(G.shape) or ns(G, *a, **k))
    random_grads(model, 0)
    MuonClip(model, qk_clip_tau=None).step()
    matrices = {}  # NS shape -> how many matrices of it, in order of first appearance
    for p in muon:
        s = muonclip.ns_shape(p)
        matrices[s] = matrices.get(s, 0) + p.numel() // math.prod(s)
    assert [tuple(c) for c in calls] == [(b, *s) for s, b in matrices.items()]
    assert len(calls) == 6 and len(muon) == 18


def test_adamw_part_matches_torch_adamw():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.norm = RMSNorm(16)
            self.proj = nn.Linear(16, 16, bias=True)

    torch.manual_seed(6)
    net = Net()
    ref_params = {n: nn.Parameter(p.detach().clone()) for n, p in net.named_parameters()}
    opt = MuonClip(net, lr=0.01, weight_decay=0.1, qk_clip_tau=None)
    adamw_names = ["embed.weight", "norm.weight", "proj.bias"]
    no_decay = [ref_params["norm.weight"], ref_params["proj.bias"]]  # 1-D: not decayed
    ref = torch.optim.AdamW([dict(params=[ref_params["embed.weight"]]), dict(params=no_decay, weight_decay=0.0)],
                            lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(3):
        random_grads(net, step)
        for n, p in net.named_parameters():
            ref_params[n].grad = p.grad.clone()
        opt.step()
        ref.step()
    for n in adamw_names:
        torch.testing.assert_close(dict(net.named_parameters())[n].detach(), ref_params[n].detach(),
                                   rtol=1e-5, atol=1e-6)


def test_adamw_update_rms_is_the_applied_update():
    """adamw_update_rms is the RMS of what the step subtracted, decay excluded: measured here on
    the weights themselves (second step, so the bias corrections are not trivial)."""
    torch.manual_seed(9)
    net = nn.ModuleDict({"embed": nn.Embedding(50, 24), "norm": RMSNorm(24)})
    lr, wd = 0.01, 0.1
    opt = MuonClip(net, lr=lr, weight_decay=wd, qk_clip_tau=None)
    for step in range(2):
        random_grads(net, step)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt.step()
    applied = torch.cat([(before[n] * (1 - lr * (wd if p.ndim > 1 else 0)) - p.detach()).flatten()
                         for n, p in net.named_parameters()])
    assert opt.last_stats["adamw_update_rms"] == pytest.approx(applied.square().mean().sqrt().item(), rel=1e-4)


def test_lr_change_does_not_recompile():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(muon_step_, backend=counter)
    ps = [torch.randn(8, 12), torch.randn(3, 6, 4)]
    bufs = [torch.zeros_like(p) for p in ps]
    lr, wd = torch.tensor(0.1), torch.tensor(0.01)
    for value in (0.1, 0.05, 0.02):
        lr.fill_(value)
        step(ps, [torch.randn_like(p) for p in ps], bufs, lr, wd)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- the split

def test_parameter_split():
    model = tiny_model(q_lora_rank=16)
    muon, adamw = split_params(model)
    muon_n, adamw_n = {n for n, _ in muon}, {n for n, _ in adamw}
    assert not muon_n & adamw_n
    assert muon_n | adamw_n == {n for n, _ in model.named_parameters()}
    assert {"embed.weight", "head.weight"} <= adamw_n and not {"embed.weight", "head.weight"} & muon_n
    for i, moe in enumerate(model.moe_layers(), start=model.args.n_dense_layers):
        for w in ("w1", "w2", "w3"):
            assert f"layers.{i}.ffn.{w}" in muon_n and getattr(moe, w).ndim == 3
        assert f"layers.{i}.ffn.gate.weight" in muon_n
        assert f"layers.{i}.ffn.shared.w1.weight" in muon_n
    for name in adamw_n - {"embed.weight", "head.weight"}:
        assert name.endswith("norm.weight"), name
    assert all(p.ndim in (2, 3) for _, p in muon)
    # the router bias is a buffer: never in an optimizer
    opt = MuonClip(model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(m.gate.bias) not in in_opt for m in model.moe_layers())
    assert [g["kind"] for g in opt.param_groups] == ["muon", "adamw", "adamw"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    assert all(p.ndim == 1 for p in opt.param_groups[2]["params"])


def test_parameter_that_fits_no_rule_is_an_error():
    model = tiny_model()
    model.layers[0].attn.temperature = nn.Parameter(torch.ones(2))  # 1-D, not a norm or bias
    with pytest.raises(ValueError, match="temperature"):
        split_params(model)
    model = tiny_model()
    model.conv = nn.Parameter(torch.ones(2, 2, 2, 2))
    with pytest.raises(ValueError, match="fits no optimizer group"):
        MuonClip(model)


# ----------------------------------------------------------------------------- QK-Clip

def all_head_logits(attn, x, cos, sin):
    """Every pre-softmax logit [B, H, T, T] of one MLA layer (causal entries only; -inf above)."""
    q_nope, q_rope = attn.query(x, cos, sin)
    c, k_rope = attn.latent(x, cos, sin)
    k, _ = attn.expand_kv(c, k_rope)
    q = torch.cat([q_nope, q_rope], dim=-1)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * attn.softmax_scale
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf"))


@pytest.mark.parametrize("q_lora_rank", [0, 16])
@torch.no_grad()
def test_qk_clip_exact(q_lora_rank):
    tau = 10.0
    model = tiny_model(q_lora_rank)
    a = model.args
    qk, kv = a.qk_head_dim, a.qk_nope_head_dim + a.v_head_dim
    for layer in model.layers:  # blow up head 0's queries and keys (nope and rope); head 1 stays small
        attn = layer.attn
        wq = attn.wq.weight if q_lora_rank == 0 else attn.wq_b.weight
        wq[:qk] *= 60
        attn.wkv_b.weight[:a.qk_nope_head_dim] *= 60
        attn.wkv_a.weight[a.kv_lora_rank:] *= 30  # the shared rotary key: head 1's rope part grows too
    opt = MuonClip(model, lr=1e-3, qk_clip_tau=tau)
    x = torch.randint(0, a.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    # one real step first, so there is momentum state to check
    with torch.enable_grad():
        model(x).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items() if "momentum_buffer" in s}
    # a training forward records the max logits; capture each layer's input to recompute them
    inputs = []
    hooks = [l.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[:3])) for l in model.layers]
    model.train()
    model.set_record_max_logits(True)
    model(x)
    for h in hooks:
        h.remove()
    max_logits = model.pop_max_logits()  # [L, H]
    before = [all_head_logits(l.attn, *inp) for l, inp in zip(model.layers, inputs)]
    torch.testing.assert_close(max_logits, torch.stack([b.amax(dim=(0, 2, 3)) for b in before]))
    assert (max_logits[:, 0] > tau).all() and (max_logits[:, 1] < tau).all(), max_logits
    untouched = {n: p.clone() for n, p in model.named_parameters()}

    stats = opt.qk_clip(max_logits)

    assert stats == {"max_logit": max_logits.max().item(), "heads_clipped": 2}
    assert opt.last_stats["heads_clipped"] == 2
    gamma = tau / max_logits[:, 0]
    for i, (layer, inp) in enumerate(zip(model.layers, inputs)):
        after = all_head_logits(layer.attn, *inp)
        vis = torch.isfinite(before[i][:, 0])
        torch.testing.assert_close(after[:, 0][vis], gamma[i] * before[i][:, 0][vis], rtol=1e-5, atol=1e-5)
        assert after[:, 0].max().item() == pytest.approx(tau, rel=1e-5)
        assert torch.equal(after[:, 1], before[i][:, 1])           # unclipped head: bit-identical
        # each row block of head 0 (the logit ratio above holds for other splits too, e.g. W_qc x
        # gamma with W_kc untouched): W_qc and W_kc x sqrt(gamma), W_qr x gamma, W_v untouched
        attn, pre, nope, g = layer.attn, f"layers.{i}.attn.", a.qk_nope_head_dim, gamma[i]
        wq_name = "wq.weight" if q_lora_rank == 0 else "wq_b.weight"
        wq = attn.get_parameter(wq_name).view(a.n_heads, qk, -1)
        old_q = untouched[pre + wq_name].view(a.n_heads, qk, -1)
        torch.testing.assert_close(wq[0, :nope], old_q[0, :nope] * g.sqrt())   # W_qc
        torch.testing.assert_close(wq[0, nope:], old_q[0, nope:] * g)          # W_qr
        wkv_b = attn.wkv_b.weight.view(a.n_heads, kv, -1)
        old = untouched[pre + "wkv_b.weight"].view(a.n_heads, kv, -1)
        torch.testing.assert_close(wkv_b[0, :nope], old[0, :nope] * g.sqrt())  # W_kc
        assert torch.equal(wkv_b[:, nope:], old[:, nope:])                     # W_v, every head
        assert torch.equal(wq[1], old_q[1]) and torch.equal(wkv_b[1], old[1])  # head 1: unclipped
        assert torch.equal(attn.wkv_a.weight, untouched[pre + "wkv_a.weight"])  # shared k_rope, latent
        assert torch.equal(attn.wo.weight, untouched[pre + "wo.weight"])
        if q_lora_rank:
            assert torch.equal(attn.wq_a.weight, untouched[pre + "wq_a.weight"])
    for p, s in opt.state.items():
        if "momentum_buffer" in s:
            assert torch.equal(s["momentum_buffer"], momentum[id(p)])


@torch.no_grad()
def test_qk_clip_off_and_tau_validation():
    model = tiny_model()
    opt = build_optimizer(model, "muonclip", lr=1e-3, weight_decay=0.1, qk_clip_tau=None)
    snapshot = [p.clone() for p in model.parameters()]
    logits = torch.full((2, 2), 500.0)
    assert opt.qk_clip(logits) == {"max_logit": 500.0, "heads_clipped": 0}
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--no-qk-clip"):
            build_optimizer(model, "muonclip", 1e-3, 0.1, bad)
    with pytest.raises(ValueError, match="muonclip, adamw"):
        build_optimizer(model, "sgd", 1e-3, 0.1, 100.0)
    with pytest.raises(ValueError, match="rows"):
        opt.qk_clip(torch.zeros(3, 2))


@pytest.mark.parametrize("name", ["muonclip", "adamw"])
@torch.no_grad()
def test_weight_decay_on_matrices_only(name):
    """Both optimizers treat parameters alike: a step with zero gradients (so a zero update) and
    weight decay > 0 shrinks every matrix by exactly (1 - lr * wd) and leaves every 1-D parameter
    (norm gains) unchanged."""
    model = tiny_model(q_lora_rank=16)
    for n, p in model.named_parameters():
        if p.ndim == 1:
            p.normal_(1.0, 0.1)  # gains away from 1, as after training
    lr, wd = 0.1, 0.5
    opt = build_optimizer(model, name, lr=lr, weight_decay=wd, qk_clip_tau=100.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    n_1d = 0
    for n, p in model.named_parameters():
        if p.ndim == 1:
            n_1d += 1
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - lr * wd), msg=lambda m: f"{n}: {m}")
    assert n_1d == 2 * 4 + 1  # per layer attn_norm, ffn_norm, q_norm, kv_norm; the final norm


def test_startup_line():
    """train.py prints describe(optimizer) at startup (tests/test_train.py checks the line)."""
    model = tiny_model()
    assert muonclip.describe(build_optimizer(model, "muonclip", 3e-3, 0.1, 100.0)) == \
        "MuonClip lr 3e-3, tau 100, wd 0.1"
    assert muonclip.describe(build_optimizer(model, "muonclip", 2e-4, 0.0, None)) == \
        "MuonClip lr 2e-4, tau off (plain Muon), wd 0"
    assert muonclip.describe(build_optimizer(model, "adamw", 1.5e-3, 0.1, 100.0)) == \
        "AdamW lr 1.5e-3, betas 0.9/0.95, wd 0.1"


def test_build_adamw_baseline():
    model = tiny_model()
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, qk_clip_tau=100.0)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("norm.weight") for n in no_decay["param_names"])
    assert "embed.weight" in decay["param_names"]
    random_grads(model, 0)
    opt.step()  # fused (or foreach) AdamW runs on this device


# ----------------------------------------------------------------------------- state round trip

def test_state_dict_roundtrip_weights_only():
    model_a = tiny_model(q_lora_rank=16)
    opt_a = MuonClip(model_a, lr=1e-2)
    for s in range(2):
        random_grads(model_a, s)
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optim": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b = tiny_model(q_lora_rank=16, seed=123)
    model_b.load_state_dict(ckpt["model"])
    opt_b = MuonClip(model_b, lr=5.0)  # wrong lr on purpose: the state dict restores 1e-2
    opt_b.load_state_dict(ckpt["optim"])
    assert [g["lr"] for g in opt_b.param_groups] == [1e-2, 1e-2, 1e-2]
    for opt, model in ((opt_a, model_a), (opt_b, model_b)):
        for g in opt.param_groups:
            g["lr"] = 3e-3  # what train.py's schedule does
        random_grads(model, 7)
        opt.step()
    for (n, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), n


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = tiny_model(q_lora_rank=16)
    opt = build_optimizer(model, "muonclip", lr=2e-2, weight_decay=0.1, qk_clip_tau=100.0)
    model.set_record_max_logits(True)
    x = torch.randint(0, 256, (4, 17))
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = opt.qk_clip(model.pop_max_logits())
        model.update_router_bias()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert math.isfinite(stats["max_logit"]) and opt.last_stats["update_rms"] > 0
