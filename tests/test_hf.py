"""hf.py against an independent reference: transformers' DeepseekV3ForCausalLM.

Both directions in fp64: a folder written by transformers' save_pretrained loaded into nanoK2, and
a nanoK2 checkpoint exported by `hf.py export` loaded by transformers.AutoModelForCausalLM. Configs
exercise q-LoRA and none, YaRN (with mscale != 1) and plain RoPE, grouped routing, a non-zero
correction bias, first-k dense layers, rms_norm_eps != 1e-6. Plus sharded folders with an index, FP8
blocks against the dequantization formula, Kimi-style tokenizer folders, the bad-input lines, and
generate.py on a folder written by transformers.
"""
import base64
import json
import os
import shutil
import subprocess
import sys
import sysconfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never ask the network

import pytest  # noqa: E402
import regex  # noqa: E402
import tiktoken  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402  (requirements.txt pins it: a missing one fails, never skips)
from safetensors.torch import load_file, save_file  # noqa: E402

import data  # noqa: E402
import generate  # noqa: E402
import hf  # noqa: E402
from checkpoint import save_pretrained  # noqa: E402
from model import ModelArgs, build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# transformers builds RoPE's angles in fp32 (inv_freq, position * inv_freq), nanoK2 in fp64: that
# alone moves fp64 logits by ~1e-7 of their scale (1.4e-7 to 3.2e-7 here). A wrong name, layout, eps
# or YaRN temperature moves them by 1e-5 or more (the latent-norm eps alone: 2.6e-5).
RTOL = 1e-6
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 0.8}
TINY = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, max_position_embeddings=64, initializer_range=0.1)
CASES = {  # q-LoRA + YaRN + grouped routing; no q-LoRA (as in Moonlight) + plain RoPE + 2 dense layers
    "qlora-yarn-grouped": dict(q_lora_rank=16, rope_scaling=YARN, n_group=4, topk_group=2,
                               first_k_dense_replace=1, rms_norm_eps=1e-5),
    "no-qlora-rope-sharded": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=2,
                                  rms_norm_eps=1e-6, rope_theta=500.0),
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def bpe():
    """The project's own BPE (data.py), trained on a few stdlib files: a real tiktoken Encoding."""
    lib = sysconfig.get_paths()["stdlib"]
    docs = [open(os.path.join(lib, n), encoding="utf-8").read() for n in ("textwrap.py", "heapq.py")]
    return tiktoken.Encoding("tiny-bpe", **data.train_bpe(docs, 300))


def hf_model(vocab_size=96, eos=None, **case):
    """A random transformers DeepseekV3ForCausalLM, its norms and router bias made non-trivial."""
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(vocab_size=vocab_size, **TINY, **case,
                                        **({} if eos is None else dict(bos_token_id=eos, eos_token_id=eos)))
    m = transformers.DeepseekV3ForCausalLM(cfg).eval()
    m.set_attn_implementation("eager")
    m.set_experts_implementation("eager")  # (the grouped one has no fp64 kernel)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        for mod in m.modules():
            if hasattr(mod, "e_score_correction_bias"):  # non-zero: it picks experts, never weights them
                mod.e_score_correction_bias.normal_(0, 0.1)
    return m


def nanok2_model(q_lora_rank, **kw):
    base = dict(vocab_size=300, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=3, n_dense_layers=1,
                n_heads=2, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4,
                n_limited_groups=2, route_scale=2.5, q_lora_rank=q_lora_rank, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64, yarn=True,
                original_seq_len=16, rope_factor=4.0, mscale=0.8, init_std=0.1)
    args = ModelArgs(**{**base, **kw})
    model = build_model(args, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        for moe in model.moe_layers():
            moe.gate.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("case", CASES)
def test_transformers_folder_loads_with_the_same_logits(tmp_path, case):
    """save_pretrained by transformers (fp64) -> hf.load_model: the same logits from a full forward,
    and from the absorbed latent cache generate.py decodes with (prefill, then one token at a time)."""
    ref = hf_model(**CASES[case]).double()
    sharded = "sharded" in case
    ref.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    if sharded:  # a multi-token-prediction layer (index num_hidden_layers) in a shard of its own
        index = json.load(open(tmp_path / "model.safetensors.index.json"))
        assert len(set(index["weight_map"].values())) > 2
        mtp = {"model.layers.3.eh_proj.weight": torch.ones(32, 64), "model.layers.3.enorm.weight": torch.ones(32)}
        save_file(mtp, tmp_path / "mtp.safetensors")
        index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
        json.dump(index, open(tmp_path / "model.safetensors.index.json", "w"))
    model = hf.load_model(str(tmp_path), dtype=torch.float64).eval()
    # every buffer in the dtype asked for: the RoPE tables and the router bias too (issue 27)
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float64}
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
        assert rel_err(model(x), want) < RTOL
        caches, P = model.make_caches(2, 12, absorbed=True), 9
        got = [model(x[:, :P], torch.arange(P), caches)]
        for t in range(P, 12):
            got.append(model(x[:, t:t + 1], torch.tensor([t]), caches))
        assert rel_err(torch.cat(got, 1), want) < RTOL
    a = model.args
    assert a.yarn == ("rope_scaling" in CASES[case])  # YaRN on iff configured
    assert a.q_lora_rank == (CASES[case]["q_lora_rank"] or 0)
    # in bf16 (a GPU run's dtype) the router stays fp32, as transformers keeps it
    half = hf.load_model(str(tmp_path), dtype=torch.bfloat16)
    gate = half.moe_layers()[0].gate
    assert gate.weight.dtype == gate.bias.dtype == torch.float32 and half.embed.weight.dtype == torch.bfloat16
    assert half.rope_cos.dtype == torch.float32  # (buffers: at least fp32, like the router)
    assert torch.equal(gate.bias, model.moe_layers()[0].gate.bias.float())


EXPORTS = {  # q-LoRA, norm_eps 1e-5 (the latent norms keep 1e-6 on both sides), in shards; no q-LoRA,
    # and YaRN with max_seq_len under original_seq_len (on all the same: the switch is yarn, not the length)
    "qlora-eps1e-5-sharded": dict(q_lora_rank=16, norm_eps=1e-5),
    "no-qlora-yarn-short": dict(q_lora_rank=0, original_seq_len=128),
}


@pytest.mark.parametrize("case", EXPORTS)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, bpe, case):
    """A nanoK2 checkpoint (checkpoint.save_pretrained + tokenizer) -> `hf.py export` -> transformers'
    AutoModelForCausalLM.from_pretrained: the same fp64 logits."""
    q_lora_rank = EXPORTS[case]["q_lora_rank"]
    model = nanok2_model(**EXPORTS[case])
    save_pretrained(model, str(tmp_path / "out"))
    data.save_encoding(bpe, str(tmp_path / "out"))
    shard = ["--max-shard-gb", str(20e3 / (1 << 30))] if q_lora_rank else []
    hf.main(["export", str(tmp_path / "out"), str(tmp_path / "hf"), *shard])
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json") == bool(q_lora_rank)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float64, attn_implementation="eager", experts_implementation="eager").eval()
    assert type(ref).__name__ == "DeepseekV3ForCausalLM"
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(model.double()(x), ref(x).logits) < RTOL
    # and back: the exported folder loads into nanoK2 as the same tensors, tokenizer included
    back = hf.load_model(str(tmp_path / "hf"))
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.float().state_dict().items())
    assert (back.args.yarn, back.args.original_seq_len, back.args.norm_eps) == \
        (True, model.args.original_seq_len, model.args.norm_eps)
    enc = hf.load_tokenizer(str(tmp_path / "hf"))
    text = open(os.path.join(ROOT, "hf.py")).read()[:2000]
    assert enc.encode_ordinary(text) == bpe.encode_ordinary(text) and enc.eot_token == bpe.eot_token


def test_a_trained_checkpoint_exports_with_the_same_logits(tmp_path, trained_checkpoint):
    """train.py's own output (trained weights, a router bias moved by the balancing rule, its BPE)
    -> `hf.py export` -> transformers: the same fp64 logits, and text tokenized alike."""
    from checkpoint import load_pretrained
    model = load_pretrained(trained_checkpoint, "cpu").double().eval()
    assert any(m.gate.bias.abs().max() > 0 for m in model.moe_layers())   # trained, not fresh
    hf.main(["export", trained_checkpoint, str(tmp_path / "hf")])
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float64, attn_implementation="eager", experts_implementation="eager").eval()
    enc = data.load_encoding(trained_checkpoint)
    x = torch.tensor([enc.encode_ordinary(open(os.path.join(ROOT, "model.py")).read()[:400])[:48]])
    with torch.no_grad():
        assert rel_err(model(x), ref(x).logits) < RTOL
    assert hf.load_tokenizer(str(tmp_path / "hf")).encode_ordinary("def f(x):\n") == enc.encode_ordinary("def f(x):\n")


def test_fp8_blocks(tmp_path, bpe):
    """Export with --fp8 (16x16 blocks here, so tiny matrices hold several, partial ones included):
    every dequantized weight is within FP8 e4m3's rounding of the original; and a folder quantized
    by hand (not by hf.py) dequantizes exactly as the formula says, block by block."""
    model = nanok2_model(16)
    save_pretrained(model, str(tmp_path / "out"))
    hf.export(str(tmp_path / "out"), str(tmp_path / "fp8"), fp8=True, fp8_block=(16, 16))
    raw = load_file(tmp_path / "fp8" / "model.safetensors")
    assert raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)  # 24 x 32
    assert raw["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router stays full precision
    back = hf.load_model(str(tmp_path / "fp8")).state_dict()
    n_quantized = 0
    for name, w in model.state_dict().items():
        got = back[name]
        if not name.endswith(("wq_a.weight", "wq_b.weight", "wkv_a.weight", "wkv_b.weight", "wo.weight",
                              "w1.weight", "w2.weight", "w3.weight", "ffn.w1", "ffn.w2", "ffn.w3")):
            assert torch.equal(got, w), name
            continue
        n_quantized += 1
        blocks = w.reshape(-1, w.shape[-1])
        # e4m3 keeps 3 mantissa bits: rounding moves a normal number by <= 2^-4 of itself, and a
        # subnormal (below 2^-6 of FP8's range, scaled) by <= 2^-10 of the block's scale
        scale = torch.zeros_like(blocks)
        for i in range(0, blocks.shape[0], 16):
            for j in range(0, blocks.shape[1], 16):
                b = blocks[i:i + 16, j:j + 16]
                scale[i:i + 16, j:j + 16] = b.abs().max() / 448
        bound = 2 ** -4 * blocks.abs() + 2 ** -9 * scale + 1e-12
        assert ((got.reshape(blocks.shape) - blocks).abs() <= bound).all(), name
        assert not torch.equal(got, w), name
    assert n_quantized == 3 * 5 + 3 + 2 * 6  # attention x3 layers, dense MLP, 2 MoE layers x (3 + 3 shared)

    # by hand: random FP8 values and block scales into a transformers-written folder
    ref = hf_model(q_lora_rank=16, n_group=1, topk_group=1, first_k_dense_replace=1, rms_norm_eps=1e-6)
    ref.save_pretrained(tmp_path / "hand")
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # [24, 32]: 2 x 2 blocks of 16
    tensors = load_file(tmp_path / "hand" / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(24, 32, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(2, 2, generator=g) + 0.5
    tensors.update({name: q, name + "_scale_inv": s})
    save_file(tensors, tmp_path / "hand" / "model.safetensors")
    cfg = json.load(open(tmp_path / "hand" / "config.json"))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [16, 16]}
    json.dump(cfg, open(tmp_path / "hand" / "config.json", "w"))
    want = torch.empty(24, 32)
    for i in range(2):
        for j in range(2):
            rows, cols = slice(16 * i, 16 * (i + 1)), slice(16 * j, 16 * (j + 1))
            want[rows, cols] = q[rows, cols].float() * s[i, j]
    got = hf.load_model(str(tmp_path / "hand")).layers[1].attn.wkv_a.weight
    assert torch.equal(got, want)


def test_tokenizer_round_trips(tmp_path, bpe):
    """The project's BPE written in Kimi's layout loads back as the same encoder (its own split
    pattern kept in tokenizer_config.json); a Kimi folder written by hand, with no pattern, splits
    with Kimi's own (checked against the `regex` module's split), names [EOS] its end of text and
    names the reserved ids."""
    hf.save_tokenizer(bpe, str(tmp_path))
    enc = hf.load_tokenizer(str(tmp_path))
    texts = [open(os.path.join(ROOT, "model.py")).read()[:3000], "naïve 你好世界 It's 2025!\n\n\tx = 1  "]
    for t in texts:
        assert enc.encode_ordinary(t) == bpe.encode_ordinary(t) and enc.decode(enc.encode_ordinary(t)) == t
    assert enc.eot_token == bpe.eot_token == enc.encode("<|endoftext|>", allowed_special="all")[0]

    kimi = tmp_path / "kimi"
    kimi.mkdir()
    ranks = sorted(bpe._mergeable_ranks.items(), key=lambda kv: kv[1])
    (kimi / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks))
    n = len(ranks)
    named = {n: "[BOS]", n + 1: "[EOS]", n + 2: "<|im_end|>", n + 3: "<|im_user|>"}
    tc = {"added_tokens_decoder": {str(i): {"content": c, "special": True, "lstrip": False} for i, c in named.items()},
          "bos_token": "[BOS]", "eos_token": {"content": "[EOS]", "special": True}}  # (the AddedToken form)
    (kimi / "tokenizer_config.json").write_text(json.dumps(tc))
    enc = hf.load_tokenizer(str(kimi))
    assert enc.eot_token == n + 1 and enc.encode("<|im_end|>[EOS]", allowed_special="all") == [n + 2, n + 1]
    assert enc.decode([n + 9]) == f"<|reserved_token_{n + 9}|>" and enc.n_vocab == n + hf.N_RESERVED
    split = regex.compile(hf.KIMI_PAT_STR, flags=regex.V1)  # V1: the class set operations (&&) Kimi uses
    for t in texts:
        ids = enc.encode_ordinary(t)
        assert enc.decode(ids) == t
        assert ids == [i for piece in split.findall(t) for i in enc.encode_ordinary(piece)]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, bpe):
    """A tiny folder written by transformers itself, with a Kimi-style tokenizer beside it."""
    d = tmp_path_factory.mktemp("hf")
    m = hf_model(vocab_size=bpe.n_vocab, eos=bpe.eot_token, q_lora_rank=None, n_group=1, topk_group=1,
                 first_k_dense_replace=1, rms_norm_eps=1e-6)
    m.save_pretrained(d, max_shard_size="40KB")
    hf.save_tokenizer(bpe, str(d))
    return str(d), m


def run_generate(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *argv], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def test_generate_reads_a_transformers_folder(hf_folder, bpe):
    """generate.py --ckpt on the folder: KeepKV at 10% runs; greedy from the full latent cache
    writes exactly the text transformers' own greedy decoding gives."""
    folder, ref = hf_folder
    prompt = "def wrap(text, width"
    r = run_generate("--ckpt", folder, "--kv-budget", "0.1", "--prompt", prompt, "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("[generate]") and "latent KV cache keepkv (budget 0.1)" in last

    r = run_generate("--out-dir", folder, "--kv-policy", "full", "--temperature", "0", "--prompt", prompt,
                     "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    ids = bpe.encode_ordinary(prompt)
    with torch.no_grad():
        for _ in range(8):
            nxt = int(ref(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == bpe.eot_token:
                break
            ids.append(nxt)
    want = bpe.decode(ids[len(bpe.encode_ordinary(prompt)):])
    assert r.stdout.rsplit("[generate]", 1)[0] == want + "\n"


def _edit_config(folder, **changes):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))


def _shards(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("model-"))


def _drop_shard(folder):
    os.remove(os.path.join(folder, _shards(folder)[1]))


def _truncate_shard(folder):
    path = os.path.join(folder, _shards(folder)[0])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("break_it,message", [
    (_drop_shard, "missing shard"),
    (_truncate_shard, "is not a readable safetensors file"),
    (lambda d: _edit_config(d, kv_lora_rank=12), "shape mismatch"),
    (lambda d: _edit_config(d, num_hidden_layers=4), "lacks the tensor model.layers.3"),
    (lambda d: _edit_config(d, quantization_config={"quant_method": "gptq", "bits": 4}),
     "unsupported quantization 'gptq'"),
    (lambda d: _edit_config(d, model_type="llama"), "unknown model_type 'llama'"),
    (lambda d: _edit_config(d, rope_scaling={"type": "linear", "factor": 2.0}), "unsupported rope_scaling"),
    (lambda d: _edit_config(d, norm_topk_prob=False), "unsupported norm_topk_prob=False"),
])
def test_bad_folders_get_one_clear_line(tmp_path, hf_folder, break_it, message):
    folder = str(tmp_path / "broken")
    shutil.copytree(hf_folder[0], folder)
    assert len(_shards(folder)) > 2
    break_it(folder)
    with pytest.raises(SystemExit) as e:
        generate.main(["--out-dir", folder, "--prompt", "x"])
    line = str(e.value.code)
    assert line.startswith("error: ") and message in line and "\n" not in line, line


def test_export_refusals(tmp_path, hf_folder):
    with pytest.raises(SystemExit) as e:
        hf.main(["export", str(tmp_path / "nothing"), str(tmp_path / "hf")])
    assert str(e.value.code).startswith("error: no checkpoint in")
    save_pretrained(nanok2_model(0), str(tmp_path / "out"))
    with pytest.raises(SystemExit) as e:
        hf.main(["export", str(tmp_path / "out"), hf_folder[0]])
    assert "exists and is not empty" in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # a folder without Kimi's tokenizer: generate.py says what it needs
        shutil.copytree(hf_folder[0], tmp_path / "no-tok", ignore=shutil.ignore_patterns("tiktoken.model"))
        generate.main(["--out-dir", str(tmp_path / "no-tok"), "--prompt", "x"])
    assert "no tiktoken.model" in str(e.value.code)
