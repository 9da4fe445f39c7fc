"""model.py against independent references: formulas, slow paths, known numbers."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import (LATENT_NORM_EPS, PRESETS, Transformer, build_model, count_params, get_args,
                   softmax_scale, yarn_inv_freq)

SMALL = dict(vocab_size=97, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1,
             n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=32)


def small_model(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return build_model(get_args("tiny", **{**SMALL, **kw}), seed=0).to(dtype)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_causality(q_lora_rank):
    model = small_model(q_lora_rank=q_lora_rank)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 11] = (y[:, 11] + 1) % 97
    a, b = model(x), model(y)
    assert torch.equal(a[:, :11], b[:, :11])
    assert not torch.allclose(a[:, 11:], b[:, 11:])


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_absorbed_equals_naive_equals_full_forward(q_lora_rank):
    """Prefill 7 tokens, then decode one at a time: both cache forms give the full forward's logits."""
    model = small_model(q_lora_rank=q_lora_rank)
    model.eval()
    tokens = torch.randint(0, 97, (2, 16))
    full = model(tokens)
    for absorbed in (False, True):
        caches = model.make_caches(2, 32, absorbed=absorbed)
        got = [model(tokens[:, :7], torch.arange(7), caches)]
        for t in range(7, 16):
            got.append(model(tokens[:, t:t + 1], torch.tensor([t]), caches))
        torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-9, atol=1e-9)


def test_cache_sizes_k2():
    """The absorbed cache holds 576 numbers per token per layer for K2; the naive one 20480."""
    args = get_args("kimi-k2")
    assert args.kv_lora_rank + args.qk_rope_head_dim == 576
    assert args.n_heads * (args.qk_head_dim + args.v_head_dim) == 20480
    model = small_model()
    latent, naive = model.make_caches(1, 8, absorbed=True)[0], model.make_caches(1, 8)[0]
    assert latent.c.shape[-1] + latent.k_rope.shape[-1] == SMALL["kv_lora_rank"] + SMALL["qk_rope_head_dim"]
    assert naive.k.shape[-2:] == (2, 12) and naive.v.shape[-2:] == (2, 8)


def test_grouped_moe_equals_loop_forward_and_backward():
    torch.manual_seed(1)
    moe = small_model(torch.float32).moe_layers()[0]
    x = torch.randn(3, 10, 32, requires_grad=True)
    outs, grads = [], []
    for loop in (False, True):
        moe.use_loop = loop
        moe.zero_grad()
        x.grad = None
        y = moe(x)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(2))
        y.backward(g)
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in (moe.w1, moe.w2, moe.w3, moe.gate.weight)])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_router_bias_changes_selection_not_weights():
    moe = small_model().moe_layers()[0]
    x = torch.randn(50, 32, dtype=torch.float64)
    w0, idx0, scores = moe.gate(x)
    moe.gate.bias[3] = 10.0  # expert 3 now always wins a slot
    w1, idx1, scores1 = moe.gate(x)
    assert (idx1 == 3).any(-1).all() and not (idx0 == 3).any(-1).all()
    torch.testing.assert_close(scores1, scores)
    # combine weights: the selected experts' UNBIASED sigmoid scores, renormalised, times route_scale
    expect = scores.gather(1, idx1)
    expect = expect / expect.sum(-1, keepdim=True) * moe.gate.route_scale
    torch.testing.assert_close(w1, expect)
    assert torch.allclose(w1.sum(-1), torch.full((50,), moe.gate.route_scale, dtype=torch.float64))


def test_routing_is_fp32_under_autocast():
    """train.py runs CUDA forwards under bf16 autocast, which runs a linear in bf16 even on fp32
    inputs. The router must not: under CPU bf16 autocast it gives the fp32 routing (same experts in
    the same order, same combine weights), on a batch where routing on bf16 scores picks other
    experts for many tokens (64 experts, top-6, as the small preset)."""
    model = small_model(torch.float32, n_routed_experts=64, n_activated_experts=6)
    gate = model.moe_layers()[0].gate
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(4))
    w32, idx32, s32 = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, idx, s = gate(x)
    s_bf16 = F.linear(x.bfloat16(), gate.weight.bfloat16()).sigmoid().float()  # what autocast did
    assert (s_bf16.topk(6).indices.sort(-1).values != idx32.sort(-1).values).any(-1).float().mean() > 0.1
    assert torch.equal(idx, idx32)
    assert s.dtype == w.dtype == torch.float32
    torch.testing.assert_close(w, w32)
    torch.testing.assert_close(s, s32)


def test_group_limited_routing_matches_brute_force():
    model = small_model(n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
    gate = model.moe_layers()[0].gate
    gate.bias.copy_(torch.randn(8, dtype=torch.float64) * 0.1)
    x = torch.randn(40, 32, dtype=torch.float64)
    _, idx, scores = gate(x)
    choice = scores + gate.bias
    for t in range(40):
        groups = choice[t].view(4, 2)
        best_groups = groups.topk(2, -1).values.sum(-1).topk(2).indices.tolist()
        allowed = [e for e in range(8) if e // 2 in best_groups]
        expect = sorted(sorted(allowed, key=lambda e: -choice[t, e].item())[:3])
        assert sorted(idx[t].tolist()) == expect


def test_bias_update_rule():
    model = small_model()
    moe = model.moe_layers()[0]
    load = torch.tensor([5.0, 1.0, 3.0, 3.0])
    moe.expert_load.copy_(load)
    model.update_router_bias()
    u = model.args.bias_update_speed
    torch.testing.assert_close(moe.gate.bias, torch.tensor([-u, u, 0.0, 0.0], dtype=torch.float64))
    assert moe.expert_load.sum() == 0


def test_expert_load_counts_routed_tokens():
    model = small_model()
    model.train()
    model(torch.randint(0, 97, (2, 10)))
    for moe in model.moe_layers():
        assert moe.expert_load.sum().item() == 2 * 10 * 2  # tokens * top-k


def test_sequence_balance_loss_formula_and_gradient():
    model = small_model(aux_loss_alpha=0.01)
    moe = model.moe_layers()[0]
    torch.manual_seed(3)
    scores = torch.rand(2, 6, 4, dtype=torch.float64)
    idx = scores.topk(2, -1).indices
    # the DeepSeek-V3 formula, with explicit loops
    expect = 0.0
    for b in range(2):
        for e in range(4):
            f = 4 / (2 * 6) * sum(int(e in idx[b, t].tolist()) for t in range(6))
            p = sum((scores[b, t, e] / scores[b, t].sum()).item() for t in range(6)) / 6
            expect += f * p
    assert moe.balance_loss(scores, idx).item() == pytest.approx(0.01 * expect / 2)
    # with alpha > 0 the loss reaches the router weights through the extra backward path
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    moe.train()
    moe(x).sum().backward()
    g_with = moe.gate.weight.grad.clone()
    moe.gate.weight.grad = None
    moe.aux_alpha = 0.0
    moe(x).sum().backward()
    assert not torch.allclose(g_with, moe.gate.weight.grad)


def _independent_count(a):
    """Parameter count written from the architecture as the DeepSeek-V3 report (arXiv 2412.19437,
    MLA and MoE) and the released K2 config describe it, independently of model.py's modules."""
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank:
        q = a.dim * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.n_heads * qk
    else:
        q = a.dim * a.n_heads * qk
    attn = (q + a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
            + a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
            + a.n_heads * a.v_head_dim * a.dim)
    expert = 3 * a.dim * a.moe_inter_dim
    moe = (a.n_routed_experts + a.n_shared_experts) * expert + a.n_routed_experts * a.dim + a.n_routed_experts
    dense = 3 * a.dim * a.inter_dim
    norms = 2 * a.dim
    n_moe = a.n_layers - a.n_dense_layers
    total = (2 * a.vocab_size * a.dim + a.dim + a.n_layers * (attn + norms)
             + a.n_dense_layers * dense + n_moe * moe)
    return total, total - n_moe * (a.n_routed_experts - a.n_activated_experts) * expert


@pytest.mark.parametrize("preset", list(PRESETS))
def test_param_counts_on_meta(preset):
    args = get_args(preset)
    with torch.device("meta"):
        model = Transformer(args)
    total, active = count_params(model)
    assert (total, active) == _independent_count(args)
    if preset == "kimi-k2":
        assert total == 1_026_408_232_448
        assert active == 32_861_500_928
    if preset == "deepseek-v3":
        assert total == 671_026_419_200
        assert 37.0e9 < active < 38.0e9


def test_k2_per_layer_counts():
    args = get_args("kimi-k2")
    with torch.device("meta"):
        model = Transformer(args)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(model.layers[0].attn) == 101_124_096
    assert n(model.layers[0].ffn) == 396_361_728
    moe = model.layers[1].ffn
    assert n(moe) + moe.gate.bias.numel() == 16_958_226_816


def _yarn_reference(a):
    """YaRN (arXiv 2309.00071) re-derived per rotary pair, in scalars: (inverse frequencies, softmax
    scale). Rotations over the original context decide between keeping the frequency (fast pairs),
    dividing it by the factor (slow pairs), or a blend; the temperature is (0.1 ln(factor) + 1)^2."""
    d, base = a.qk_rope_head_dim, a.rope_theta
    # (fractional) index of the rotary pair that completes r rotations within original_seq_len
    dim_for = lambda r: d * math.log(a.original_seq_len / (2 * math.pi * r)) / (2 * math.log(base))
    lo, hi = max(math.floor(dim_for(a.beta_fast)), 0), min(math.ceil(dim_for(a.beta_slow)), d - 1)
    hi = hi + 0.001 if hi == lo else hi
    freqs = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        blend = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: keep, 1: interpolate
        freqs.append(theta * (1 - blend) + theta / a.rope_factor * blend)
    m = 0.1 * a.mscale * math.log(a.rope_factor) + 1
    return freqs, m * m / math.sqrt(a.qk_head_dim)


@pytest.mark.parametrize("preset", ["kimi-k2", "deepseek-v3"])
def test_yarn_frequencies(preset):
    """The released configs (the presets) have YaRN on; its frequencies and temperature match the
    scalar re-derivation."""
    a = get_args(preset)
    assert a.yarn
    freqs, scale = _yarn_reference(a)
    assert yarn_inv_freq(a).double().tolist() == pytest.approx(freqs, rel=1e-6)
    assert softmax_scale(a) == pytest.approx(scale) and a.qk_head_dim == 192


@pytest.mark.parametrize("max_seq_len", [16, 64])
def test_yarn_is_a_switch_not_a_length(max_seq_len):
    """ModelArgs.yarn alone decides, on both sides of original_seq_len (32 here). Off: plain RoPE
    tables and softmax scale 1/sqrt(Dn+Dr) even past it, as a kimi-k2-preset run training at 4k
    needs. On: YaRN's tables and temperature even within it, as transformers applies YaRN whenever
    rope_scaling says so."""
    d, base = SMALL["qk_rope_head_dim"], 10000.0
    plain = [base ** (-2 * i / d) for i in range(d // 2)], (SMALL["qk_nope_head_dim"] + d) ** -0.5
    t = torch.arange(max_seq_len, dtype=torch.float64)
    for yarn in (False, True):
        model = small_model(max_seq_len=max_seq_len, original_seq_len=32, rope_factor=4.0, yarn=yarn)
        freqs, scale = _yarn_reference(model.args) if yarn else plain
        angles = torch.outer(t, torch.tensor(freqs, dtype=torch.float64))
        torch.testing.assert_close(model.rope_cos, angles.cos(), rtol=0, atol=1e-7)  # (fp32 tables)
        torch.testing.assert_close(model.rope_sin, angles.sin(), rtol=0, atol=1e-7)
        assert all(layer.attn.softmax_scale == pytest.approx(scale, rel=1e-12) for layer in model.layers)
    yarn_freqs, yarn_scale = _yarn_reference(model.args)  # the two really differ here
    assert yarn_freqs[-1] == pytest.approx(plain[0][-1] / 4) and yarn_scale > plain[1] * 1.2


def test_latent_norms_keep_eps_1e6():
    """q_norm and kv_norm use 1e-6 whatever norm_eps is, as DeepSeek-V3 and transformers do (checked
    against transformers with rms_norm_eps 1e-5 in tests/test_hf.py); the other norms use norm_eps."""
    model = small_model(q_lora_rank=12, norm_eps=1e-5)
    attn = model.layers[0].attn
    assert attn.q_norm.eps == attn.kv_norm.eps == LATENT_NORM_EPS == 1e-6
    assert model.norm.eps == model.layers[0].attn_norm.eps == model.layers[0].ffn_norm.eps == 1e-5


def test_bad_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*nano, tiny, small, kimi-k2, deepseek-v3"):
        get_args("huge")
    with pytest.raises(ValueError, match="unknown model field"):
        get_args("tiny", n_expertz=3)


def test_compiled_block_matches_eager():
    """The grouped-matmul custom op survives torch.compile (fp32 on CPU), forward and backward."""
    model = small_model(torch.float32)
    block = model.layers[1]
    x = torch.randn(2, 8, 32, requires_grad=True)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    eager = block(x, cos, sin)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, cos, sin)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-4, atol=1e-5)


def test_recorded_max_logits_match_explicit_logits():
    """The per-head max the training forward records (max over micro-batches) equals the max of the
    explicitly computed causal logits q.k * scale."""
    model = small_model(q_lora_rank=12)
    model.train()
    model.set_record_max_logits(True)
    xs = [torch.randint(0, 97, (2, 16)) for _ in range(2)]
    for x in xs:
        model(x)
    got = model.pop_max_logits()
    assert torch.isinf(model.pop_max_logits()).all()  # popped = reset
    model.set_record_max_logits(False)
    expect = torch.full_like(got, float("-inf"))
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    for x in xs:
        h = model.embed(x)
        for i, layer in enumerate(model.layers):
            a = layer.attn
            hn = layer.attn_norm(h)
            q = torch.cat(a.query(hn, cos, sin), -1)
            k, _ = a.expand_kv(*a.latent(hn, cos, sin))
            logits = torch.einsum("bthd,bshd->bhts", q, k) * a.softmax_scale
            logits = logits.masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
            expect[i] = torch.maximum(expect[i], logits.amax(dim=(0, 2, 3)))
            h = layer(h, cos, sin)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
