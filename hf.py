"""hf.py: released checkpoints in, Hugging Face folders out (DeepSeek-V3, Kimi K2, Moonlight).

    python hf.py export out/ HF_DIR            # a nanoK2 checkpoint -> a transformers folder
    python hf.py export out/ HF_DIR --fp8      # the same, linear weights in FP8 128x128 blocks
    python generate.py --ckpt HF_DIR           # generate.py reads such a folder directly

The released models and model.py are the same network; only the packaging differs. Three things
separate a Hugging Face folder from a nanoK2 checkpoint, and this file is those three translations:
  1. Names and experts. `model.layers.3.self_attn.kv_a_proj_with_mqa.weight` there is
     `layers.3.attn.wkv_a.weight` here: one table (LAYER_NAMES) read in both directions. Experts: there
     one tensor per expert (`mlp.experts.7.gate_proj.weight`, [F, D]), here one stack per projection
     (`ffn.w1`, [E, F, D], expert j in row j) so the MoE runs as grouped matmuls. Row layouts already
     agree: the released q_b_proj / kv_a_proj rows keep RoPE's pairs interleaved (transformers'
     rope_interleave=True), as model.apply_rope expects.
  2. The config. config.json's field names map onto ModelArgs (config_to_args / args_to_config), and
     its `rope_scaling` onto the YaRN fields (rope_from_hf / rope_to_hf: the one place for that rule).
     Fields that would change the arithmetic in a way model.py cannot follow are refused by name.
  3. FP8. DeepSeek-V3 and Kimi K2 store the linear weights as float8_e4m3fn plus a float32
     `{name}_scale_inv` [ceil(out/128), ceil(in/128)]: weight = fp8 value * the scale of its 128x128
     block (the last block of a row or column may be partial). They are dequantized to the run's
     dtype on load; `--fp8` writes the same format.
Plus Kimi's tokenizer: `tiktoken.model` (base64 token, rank per line) and the special tokens of
`tokenizer_config.json` become a tiktoken.Encoding, the type generate.py already uses.

Memory. A released model does not fit twice: Kimi K2 is ~1 TB in FP8. The model is built on the meta
device (no memory), allocated once in the run's dtype on the target device, and each tensor is then
read from its memory-mapped shard and copied into place, one at a time. Peak host memory: the model
(when on the CPU) plus the shard pages being read, never a second copy of the weights. Multi-token
prediction layers (layer index >= num_hidden_layers) are not part of the causal LM and are skipped.

Not done here: DeepSeek-V3's own tokenizer (a Hugging Face tokenizer.json) is not read, and nothing
shards a model over several GPUs for inference, so Kimi K2 and DeepSeek-V3 load only where one
device holds them.
"""
import argparse
import base64
import json
import math
import os
import shutil
import sys

import tiktoken
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint
import data
import disk
from config import DefaultsHelpFormatter
from model import ModelArgs, Transformer

MODEL_TYPES = ("deepseek_v3", "kimi_k2")        # the same fields; Kimi K2 ships its own name
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


# ----------------------------------------------------------------------------- 1. names and experts

TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
LAYER_NAMES = {  # nanoK2 name under layers.{i}.  ->  HF name under model.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",             # q_lora_rank = 0 (Moonlight)
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",                 # dense layers: SwiGLU w2(silu(w1 x) * w3 x)
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",                    # MoE layers
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.w1": "mlp.experts.{j}.gate_proj.weight",            # [E, F, D] here, E tensors there
    "ffn.w3": "mlp.experts.{j}.up_proj.weight",
    "ffn.w2": "mlp.experts.{j}.down_proj.weight",
}


def hf_names(name: str, n_experts: int) -> list[str]:
    """The HF tensor(s) holding nanoK2 tensor `name`: one, or one per expert (row j = expert j)."""
    if name in TOP_NAMES:
        return [TOP_NAMES[name]]
    _, i, rest = name.split(".", 2)  # "layers", "3", "attn.wkv_a.weight"
    hf = f"model.layers.{i}.{LAYER_NAMES[rest]}"
    return [hf.format(j=j) for j in range(n_experts)] if "{j}" in hf else [hf]


def _layer_of(hf_name: str) -> int | None:
    parts = hf_name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


# ----------------------------------------------------------------------------- 2. the config
# RoPE first: rope_from_hf / rope_to_hf are the only code here that knows how model.py switches
# YaRN on (ModelArgs.yarn); a change to that rule changes these two only.

def rope_from_hf(cfg: dict) -> dict:
    """config.json's RoPE fields -> ModelArgs' (max_seq_len, yarn, original_seq_len, rope_*, beta_*, mscale).

    Both sides switch YaRN the same way: on iff rope_scaling is yarn (ModelArgs.yarn), whatever
    max_position_embeddings is. Without it the YaRN fields keep ModelArgs' defaults, unused.
    YaRN's temperature: transformers multiplies the softmax scale by mscale(factor, mscale_all_dim)^2
    and cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim); model.py has only the
    first, so the two must be equal (they are in every released config) and `mscale` takes their value.
    """
    new_style = cfg.get("rope_parameters") or {}  # what transformers 5 writes, rope_theta inside
    rope = cfg.get("rope_scaling") or new_style
    kind = rope.get("rope_type", rope.get("type", "default"))
    orig, factor = rope.get("original_max_position_embeddings"), rope.get("factor")
    ms, ms_all = rope.get("mscale"), rope.get("mscale_all_dim")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if kind != "default" and (kind != "yarn" or not isinstance(orig, int) or not (number(factor) and factor > 1)
                              or not number(ms) or ms != ms_all or rope.get("attention_factor") is not None
                              or not rope.get("truncate", True)):
        raise ValueError(f"unsupported rope_scaling {json.dumps(rope)} in config.json: nanoK2 runs YaRN with "
                         f"factor > 1, mscale == mscale_all_dim and original_max_position_embeddings, or none")
    theta = cfg.get("rope_theta", new_style.get("rope_theta"))
    max_len = cfg.get("max_position_embeddings")
    if theta is None or max_len is None:
        raise ValueError("config.json lacks rope_theta or max_position_embeddings; it is not a "
                         "DeepSeek-V3 config: point at the model's own config.json")
    if kind == "default":  # (the values are checked by ModelArgs.check, in config_to_args)
        return dict(max_seq_len=max_len, yarn=False, rope_theta=theta)
    return dict(max_seq_len=max_len, yarn=True, original_seq_len=orig, rope_theta=theta,
                rope_factor=factor, beta_fast=rope.get("beta_fast") or 32,
                beta_slow=rope.get("beta_slow") or 1, mscale=ms)


def rope_to_hf(a: ModelArgs) -> dict:
    """The inverse of rope_from_hf, as the released configs write it (rope_scaling, type yarn)."""
    out = {"max_position_embeddings": a.max_seq_len, "rope_theta": a.rope_theta, "rope_scaling": None}
    if a.yarn:
        out["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": a.rope_factor,
                               "original_max_position_embeddings": a.original_seq_len,
                               "beta_fast": a.beta_fast, "beta_slow": a.beta_slow,
                               "mscale": a.mscale, "mscale_all_dim": a.mscale}
    return out


# config.json fields that must hold these values: anything else is arithmetic model.py does not do
REQUIRED = {"hidden_act": "silu", "norm_topk_prob": True, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "tie_word_embeddings": False, "attention_bias": False,
            "rope_interleave": True, "moe_layer_freq": 1}


# ModelArgs field -> its config.json name (rope_from_hf reads the RoPE fields); None: optional
HF_NAMES = {"vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
            "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
            "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
            "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
            "n_activated_experts": "num_experts_per_tok", "route_scale": "routed_scaling_factor",
            "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
            "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "norm_eps": "rms_norm_eps"}
HF_OPTIONAL = {"n_expert_groups": ("n_group", 1), "n_limited_groups": ("topk_group", 1),
               "aux_loss_alpha": ("aux_loss_alpha", 0.0), "q_lora_rank": ("q_lora_rank", 0),
               "init_std": ("initializer_range", 0.02)}  # null or absent: the default
HF_ROPE_NAMES = {"max_seq_len": "max_position_embeddings", "original_seq_len": "rope_scaling.original_max_"
                 "position_embeddings", "rope_factor": "rope_scaling.factor", "beta_fast": "rope_scaling.beta_fast",
                 "beta_slow": "rope_scaling.beta_slow", "mscale": "rope_scaling.mscale"}


def config_to_args(cfg: dict, path: str = "config.json") -> ModelArgs:
    """A DeepSeek-V3 / Kimi K2 config.json (as a dict) -> ModelArgs, or one ValueError line that
    names `path`, the field as config.json spells it, its value and the fix (ModelArgs.check)."""
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {kind!r} in {path}: hf.py reads {' and '.join(MODEL_TYPES)} "
                         f"(DeepSeek-V3, Kimi K2, Moonlight) folders only")
    for k, want in REQUIRED.items():
        if k in cfg and cfg[k] != want:
            raise ValueError(f"unsupported {k}={cfg[k]!r} in {path}: nanoK2 implements {k}={want!r} only")
    missing = [hf for hf in HF_NAMES.values() if hf not in cfg]
    if missing:
        raise ValueError(f"{path} lacks the field {missing[0]!r}; it is not a complete DeepSeek-V3 "
                         f"config: point at the model's own config.json")
    fields = {k: cfg[hf] for k, hf in HF_NAMES.items()}
    fields.update({k: default if cfg.get(hf) is None else cfg[hf] for k, (hf, default) in HF_OPTIONAL.items()})
    names = {**HF_NAMES, **{k: hf for k, (hf, _) in HF_OPTIONAL.items()}, **HF_ROPE_NAMES}
    return ModelArgs(**fields, **rope_from_hf(cfg)).check(
        f"{path}: ", lambda k: names.get(k, k), "; correct it, or point at the model's own config.json")


def args_to_config(a: ModelArgs) -> dict:
    """ModelArgs -> a config.json that transformers' DeepseekV3ForCausalLM loads."""
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": a.vocab_size, "hidden_size": a.dim, "intermediate_size": a.inter_dim,
            "moe_intermediate_size": a.moe_inter_dim, "num_hidden_layers": a.n_layers,
            "first_k_dense_replace": a.n_dense_layers, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_heads, "n_routed_experts": a.n_routed_experts,
            "n_shared_experts": a.n_shared_experts, "num_experts_per_tok": a.n_activated_experts,
            "n_group": a.n_expert_groups, "topk_group": a.n_limited_groups,
            "routed_scaling_factor": a.route_scale, "aux_loss_alpha": a.aux_loss_alpha,
            "q_lora_rank": a.q_lora_rank or None, "kv_lora_rank": a.kv_lora_rank,
            "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
            "v_head_dim": a.v_head_dim, "rms_norm_eps": a.norm_eps, "initializer_range": a.init_std,
            "num_nextn_predict_layers": 0, **{k: v for k, v in REQUIRED.items() if k != "moe_layer_freq"},
            **rope_to_hf(a)}


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a file; point at a model folder whose config.json is a file")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no config.json in {folder!r}; point at a Hugging Face model folder") from None
    except ValueError as e:
        raise ValueError(f"{path} is not readable JSON ({e}); restore it from the model's release") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a model config (not a JSON object)")
    return cfg


def is_hf_folder(folder: str) -> bool:
    """A Hugging Face folder's config.json names a model_type; nanoK2's holds model_args."""
    try:
        cfg = read_config(folder)
    except (FileNotFoundError, ValueError):
        return False
    return "model_type" in cfg and "model_args" not in cfg


# ----------------------------------------------------------------------------- 3. FP8 blocks

def fp8_block(cfg: dict) -> tuple[int, int] | None:
    """The weight block of a block-FP8 checkpoint, None when not quantized; other schemes refused."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    block = q.get("weight_block_size")
    if (q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3" or not isinstance(block, list)
            or len(block) != 2):
        raise ValueError(f"unsupported quantization {q.get('quant_method')!r} in config.json "
                         f"({json.dumps(q)}): nanoK2 reads bf16/fp16/fp32 weights and block FP8 (e4m3, "
                         f"weight_block_size); dequantize the checkpoint to bf16 first")
    return block[0], block[1]


def quantize_fp8(w: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], scale_inv fp32 [ceil(out/b0), ceil(in/b1)]), each
    block scaled so that its largest magnitude lands on FP8's largest value."""
    (b0, b1), (rows, cols) = block, w.shape
    padded = F.pad(w.float(), (0, -cols % b1, 0, -rows % b0))   # whole blocks; the pad is cut below
    blocks = padded.view(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(padded)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    """The inverse: each element times its block's scale (a partial last block included)."""
    (b0, b1), (rows, cols) = block, q.shape
    s = scale_inv.float().repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:rows, :cols]
    return q.float() * s


# ----------------------------------------------------------------------------- reading a folder

def weight_map(folder: str) -> dict[str, str]:
    """{tensor name: file}, from model.safetensors.index.json or the one model.safetensors."""
    index, single = (os.path.join(folder, n) for n in ("model.safetensors.index.json", "model.safetensors"))
    if os.path.exists(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
            assert isinstance(wm, dict)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise ValueError(f"{index} is not a safetensors index (no weight_map: {e}); restore it "
                             f"from the model's release") from None
        return wm
    if os.path.exists(single):
        with _open(folder, "model.safetensors") as f:
            return {k: "model.safetensors" for k in f.keys()}
    raise FileNotFoundError(f"no weights in {folder!r} (model.safetensors or model.safetensors.index.json "
                            f"with its shards); download the whole model folder")


def _open(folder: str, file: str):
    path = os.path.join(folder, file)
    try:
        return safe_open(path, "pt")  # memory-mapped: a tensor is read only when asked for
    except Exception as e:  # safetensors has its own error types for a truncated/garbled file
        raise ValueError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); it is "
                         f"truncated or corrupt: download it again") from None


def _param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    # the router stays at least fp32, as released (and in transformers): a bf16 gate re-ranks experts
    return torch.promote_types(dtype, torch.float32) if name.endswith("gate.weight") else dtype


def allocate(model: Transformer, device, dtype) -> Transformer:
    """Give a meta-built model its memory, once, in `dtype` on `device`, ready to be filled."""
    for name, p in model.named_parameters():  # dtypes set while on meta: nothing allocated yet
        p.data = p.data.to(_param_dtype(name, dtype))
    for module in model.modules():  # the rotary tables, the router bias: at least fp32, as the router
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                module._buffers[name] = b.to(torch.promote_types(dtype, torch.float32))
    model.to_empty(device=device)
    # model.py's own init sets the rotary tables (its YaRN rule) and the runtime buffers; the weights
    # it draws are all overwritten by the checkpoint (load_model checks that every one is there)
    model.init_weights()
    return model


def run_dtype(cfg: dict, device) -> torch.dtype:
    """fp32 on the CPU; on a GPU the checkpoint's own dtype (bf16 for the released models, and for
    FP8 ones, whose weights are dequantized to it)."""
    if torch.device(device).type == "cpu":
        return torch.float32
    name = cfg.get("torch_dtype", cfg.get("dtype")) or "bfloat16"
    return {"float32": torch.float32, "float16": torch.float16}.get(name, torch.bfloat16)


@torch.no_grad()
def load_model(folder: str, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """The model of a Hugging Face folder. Every problem is one ValueError (FileNotFoundError for a
    missing file) naming the file or tensor and the fix, found before any memory is allocated
    (or, for a shard that is corrupt inside, while reading it)."""
    cfg = read_config(folder)
    args, block = config_to_args(cfg, os.path.join(folder, "config.json")), fp8_block(cfg)
    files = weight_map(folder)
    with torch.device("meta"):
        model = Transformer(args)
    wanted = {hf: name for name in model.state_dict() for hf in hf_names(name, args.n_routed_experts)}
    missing = [hf for hf in wanted if hf not in files]
    if missing:
        raise ValueError(f"{folder!r} lacks the tensor {missing[0]} ({len(missing)} missing in all) that "
                         f"config.json implies; the weights and config.json come from different models")
    for hf in files:  # anything else must be a quantization scale or a multi-token-prediction layer
        layer = _layer_of(hf)
        if hf not in wanted and not hf.endswith("_scale_inv") and not (layer is not None and layer >= args.n_layers):
            raise ValueError(f"unexpected tensor {hf} in {files[hf]}: not part of a DeepSeek-V3 model "
                             f"with this config.json; the weights and config.json come from different models")
    by_file: dict[str, list[str]] = {}
    for hf in wanted:
        by_file.setdefault(files[hf], []).append(hf)
    for file in by_file:
        if not os.path.exists(os.path.join(folder, file)):
            raise FileNotFoundError(f"missing shard {os.path.join(folder, file)}: the index lists it; "
                                    f"download it (the folder is incomplete)")
    state = allocate(model, device, dtype or run_dtype(cfg, device)).state_dict()
    for file, names in sorted(by_file.items()):  # one shard open at a time, one tensor in memory
        with _open(folder, file) as f:
            for hf in names:
                t = state[wanted[hf]]
                expert = int(hf.split(".")[5]) if t.dim() == 3 else None  # model.layers.i.mlp.experts.j
                _copy_in(folder, f, file, hf, t if expert is None else t[expert], files, block)
    return model


def _copy_in(folder, f, file, hf, target, files, block):
    try:
        t = f.get_tensor(hf)
    except Exception as e:
        raise ValueError(f"{os.path.join(folder, file)} does not hold {hf} as its index says "
                         f"({str(e).splitlines()[0]}); the shard comes from another checkpoint") from None
    if t.dtype == torch.float8_e4m3fn:
        scale = hf + "_scale_inv"
        if block is None or scale not in files:
            raise ValueError(f"unsupported quantization: {hf} is float8 without a block-FP8 "
                             f"quantization_config and {scale}; dequantize the checkpoint first")
        if files[scale] == file:  # (the usual case: the scale sits in its weight's shard)
            s = f.get_tensor(scale)
        else:
            with _open(folder, files[scale]) as g:
                s = g.get_tensor(scale)
        if t.dim() != 2 or s.shape != (math.ceil(t.shape[0] / block[0]), math.ceil(t.shape[1] / block[1])):
            raise ValueError(f"shape mismatch: {scale} is {list(s.shape)}, which does not tile {hf} "
                             f"{list(t.shape)} in {block[0]}x{block[1]} blocks; the shard is corrupt")
        t = dequantize_fp8(t, s, block)
    elif not t.is_floating_point() or t.element_size() < 2:
        raise ValueError(f"unsupported quantization: {hf} in {file} is {t.dtype}; nanoK2 reads bf16/"
                         f"fp16/fp32 and block FP8 (e4m3) weights: dequantize the checkpoint first")
    if t.shape != target.shape:
        raise ValueError(f"shape mismatch: {hf} in {file} is {list(t.shape)}, but config.json implies "
                         f"{list(target.shape)}; the weights and config.json come from different models")
    target.copy_(t)


# ----------------------------------------------------------------------------- Kimi's tokenizer

# The pre-tokenizer split of Kimi K2 / Moonlight: it lives in their tokenization_kimi.py, code this
# project never runs, so it is restated here. Han runs, then words (case-aware, contractions), up to
# 3 digits, punctuation runs, newlines, whitespace.
KIMI_PAT_STR = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
N_RESERVED = 256  # Kimi reserves the 256 ids after the ranks for special tokens


class HFEncoding(tiktoken.Encoding):
    """A tiktoken.Encoding whose end-of-text is the folder's eos_token ([EOS] on Kimi), which
    generate.py reads as `eot_token` (tiktoken's own looks up <|endoftext|>)."""

    def __init__(self, name, *, eos_token: int, **spec):
        super().__init__(name, **spec)
        self._eos_token = eos_token

    @property
    def eot_token(self) -> int:
        return self._eos_token


def load_tokenizer(folder: str) -> HFEncoding:
    """tiktoken.model + tokenizer_config.json -> an Encoding; ValueError/FileNotFoundError otherwise."""
    path = os.path.join(folder, "tiktoken.model")
    if not os.path.exists(path):
        other = " (it holds a tokenizer.json, DeepSeek-V3's format, which nanoK2 does not read)" \
            if os.path.exists(os.path.join(folder, "tokenizer.json")) else ""
        raise FileNotFoundError(f"no tiktoken.model in {folder!r}{other}; generate.py needs Kimi's tokenizer "
                                f"files (tiktoken.model + tokenizer_config.json) beside the weights")
    try:
        ranks = {}
        with open(path, "rb") as f:  # parsed here: tiktoken's loader would copy it into its cache
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        path = os.path.join(folder, "tokenizer_config.json")
        with open(path) as f:
            tc = json.load(f)
        named = {int(i): t["content"] for i, t in tc.get("added_tokens_decoder", {}).items()}
        n = len(ranks)
        specials = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + N_RESERVED)}
        specials.update({t: i for i, t in named.items()})
        eos = tc["eos_token"]
        eos = eos["content"] if isinstance(eos, dict) else eos
        return HFEncoding(os.path.basename(os.path.abspath(folder)), eos_token=specials[eos],
                          pat_str=tc.get("pat_str", KIMI_PAT_STR), mergeable_ranks=ranks,
                          special_tokens=specials)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # binascii.Error is a ValueError
        raise ValueError(f"the tokenizer file {path} is missing or corrupt ({type(e).__name__}: {e}); "
                         f"restore it from the model's release") from None


def save_tokenizer(enc: tiktoken.Encoding, folder: str, eos_token: int | None = None) -> None:
    """Kimi's layout: tiktoken.model + tokenizer_config.json (special tokens by id, eos_token). A
    split pattern other than Kimi's is kept in tokenizer_config.json's `pat_str`."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    with open(os.path.join(folder, "tiktoken.model"), "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks)
    eos_token = enc.eot_token if eos_token is None else eos_token
    names = {i: t for t, i in enc._special_tokens.items()}
    tc = {"added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in sorted(names.items())},
          "bos_token": names[eos_token], "eos_token": names[eos_token]}
    if enc._pat_str != KIMI_PAT_STR:
        tc["pat_str"] = enc._pat_str
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=1)


# ----------------------------------------------------------------------------- writing a folder

def hf_state(model: Transformer, fp8_blocks=None):
    """(HF name, tensor) pairs of the model, experts unstacked; with fp8_blocks, each linear weight
    of the layers (the *_proj modules: not norms, not the router) as FP8 plus its _scale_inv."""
    for name, t in model.state_dict().items():
        names = hf_names(name, model.args.n_routed_experts)
        for j, hf in enumerate(names):
            w = (t[j] if t.dim() == 3 else t).detach().cpu()  # expert stacks are the 3-D tensors
            if fp8_blocks and hf.startswith("model.layers.") and "_proj" in hf:
                q, s = quantize_fp8(w, fp8_blocks)
                yield hf, q
                yield hf + "_scale_inv", s
            else:
                yield hf, w.clone(memory_format=torch.contiguous_format)  # safetensors refuses shared storage


def save_hf(model: Transformer, folder: str, enc: tiktoken.Encoding | None = None, fp8: bool = False,
            max_shard_bytes: int = 5 << 30, fp8_block=(128, 128)) -> list[str]:
    """Write `model` as a Hugging Face folder (config.json, safetensors shards + index, tokenizer).
    Returns the weight files written. `folder` must be new or empty: stale shards would mix in."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"{folder!r} exists and is not empty; export into a new folder")
    config = args_to_config(model.args)  # (refuses what would not give the same logits)
    dtypes = {p.dtype for p in model.parameters()}
    config["torch_dtype"] = "bfloat16" if fp8 else str(next(iter(dtypes))).removeprefix("torch.")
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": list(fp8_block)}
    if enc is not None:
        config["bos_token_id"] = config["eos_token_id"] = enc.eot_token
    json.dumps(config, allow_nan=False)  # nothing that is not JSON (NaN, Infinity) reaches the file
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        with disk.full_is_one_line(folder, lambda: sum(t.numel() * t.element_size() for t in
                                                            model.state_dict().values()), "exporting"):
            return _write_hf(model, folder, enc, config, fp8, max_shard_bytes, fp8_block)
    except BaseException:
        # a folder that was new or empty: whatever the export wrote into it goes (a full disk, Ctrl-C)
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if created:
            os.rmdir(folder)
        raise


def _write_hf(model, folder, enc, config, fp8, max_shard_bytes, fp8_block) -> list[str]:
    # Fill one shard at a time and write it when full (the model plus one shard in memory); shards
    # get their final names, which need the count, once all are written.
    shards, shard, size = [], {}, 0  # written shards as (names, bytes); the one being filled

    def flush():
        save_file(shard, os.path.join(folder, f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
        shards.append((list(shard), size))

    for name, t in hf_state(model, fp8_block if fp8 else None):
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name], size = t, size + nbytes
    flush()
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for k, file in enumerate(files):
        os.replace(os.path.join(folder, f"shard-{k}.tmp"), os.path.join(folder, file))
    if n > 1:
        index = {"metadata": {"total_size": sum(size for _, size in shards)},
                 "weight_map": {name: file for file, (names, _) in zip(files, shards) for name in names}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
    if enc is not None:
        save_tokenizer(enc, folder)
    with open(os.path.join(folder, "config.json"), "w") as f:  # last: a folder with it is complete
        json.dump(config, f, indent=1, allow_nan=False)
    return files


def export(out_dir: str, hf_dir: str, fp8: bool = False, max_shard_bytes: int = 5 << 30,
           fp8_block=(128, 128)) -> list[str]:
    """A nanoK2 checkpoint folder (train.py's out/) -> a Hugging Face folder, tokenizer included."""
    model = checkpoint.load_pretrained(out_dir, "cpu")
    enc = data.load_encoding(out_dir) if os.path.exists(os.path.join(out_dir, "tokenizer.json")) else None
    return save_hf(model, hf_dir, enc, fp8, max_shard_bytes, fp8_block)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block, like train.py's and generate.py's
        self.exit(2, f"error: {message} (see: python {self.prog} --help)\n")


def main(argv=None):
    p = _Parser(prog="hf.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a nanoK2 checkpoint as a Hugging Face (transformers) folder",
                       formatter_class=DefaultsHelpFormatter)
    e.add_argument("out_dir", help="checkpoint folder written by train.py")
    e.add_argument("hf_dir", help="new folder to write")
    e.add_argument("--fp8", action="store_true", help="linear weights as float8_e4m3fn in 128x128 blocks")
    e.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GB)")
    args = p.parse_args(argv)
    if not 0 < args.max_shard_gb <= 2**33:  # (NaN fails too; 2**33 GB: 2**63 bytes)
        e.error(f"--max-shard-gb must be a positive number of GB, at most 2**33, got {args.max_shard_gb:g}")
    try:
        for path, what in ((args.out_dir, "the checkpoint folder"), (args.hf_dir, "the folder to write")):
            checkpoint.check_folder(path, what)
        if os.path.isdir(args.hf_dir) and os.listdir(args.hf_dir):
            raise ValueError(f"{args.hf_dir!r} exists and is not empty; export into a new folder")
        files = export(args.out_dir, args.hf_dir, args.fp8, int(args.max_shard_gb * (1 << 30)))
    except (FileNotFoundError, ValueError) as err:  # (disk.DiskFull is a ValueError)
        sys.exit(f"error: {err}")
    print(f"wrote {args.hf_dir}: config.json, {len(files)} safetensors file(s)"
          f"{' (FP8 blocks)' if args.fp8 else ''}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({args.hf_dir!r}) or generate.py --ckpt")


if __name__ == "__main__":
    main()
