"""The K2 layout's numbers: ModelArgs, the presets from nano to kimi-k2, and the one check every
loader uses.

A model is built from a ModelArgs (DeepSeek-V3's field names; model.py's docstring maps each field
to its symbol and gives its tiny and kimi-k2 sizes). Three roads lead to one, and each ends in
`ModelArgs.check`, so a bad number is one line naming where it came from, before any tensor exists:
  get_args(preset, **overrides)   a preset, with train.py's flags (--dim 128 ...) on top
  ModelArgs.from_config           the config.json of a folder train.py wrote (checkpoint.py)
  hf.config_to_args               the config.json of a Hugging Face folder (hf.py)
train.py's flags reach a ModelArgs through add_model_flags and args_from_flags. Command-line numbers
that are not model fields (steps, batch sizes, rates) pass `check_flags`; `parser` and `run_cli`
give every script the same one-line errors.
"""
import argparse
import copy
import math
import os
import sys
from dataclasses import dataclass, fields


@dataclass
class ModelArgs:
    vocab_size: int = 8192
    dim: int = 192                    # hidden size of the residual stream
    inter_dim: int = 512              # SwiGLU width of the dense layer(s)
    moe_inter_dim: int = 96           # SwiGLU width of one expert
    n_layers: int = 4
    n_dense_layers: int = 1           # first k layers use a dense MLP (first_k_dense_replace)
    n_heads: int = 4
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2      # top-k
    n_expert_groups: int = 1          # group-limited routing (DeepSeek-V3: 8 groups, keep 4)
    n_limited_groups: int = 1
    route_scale: float = 1.0          # routed_scaling_factor, applied after renormalising top-k
    bias_update_speed: float = 1e-3   # u in b_i += u * sign(mean_load - load_i)
    aux_loss_alpha: float = 0.0       # sequence-wise balance loss; 0 = off (aux-loss-free only)
    # MLA
    q_lora_rank: int = 0              # 0 = no query compression (q = wq(x))
    kv_lora_rank: int = 64            # latent size c
    qk_nope_head_dim: int = 32        # per-head key/query dims without position
    qk_rope_head_dim: int = 16        # per-head dims that get RoPE (one key shared by all heads)
    v_head_dim: int = 32
    # positions
    max_seq_len: int = 256            # longest context the model is built for
    yarn: bool = False                # YaRN (context extension) on; off = plain RoPE at any max_seq_len
    original_seq_len: int = 4096      # YaRN: the context the model was pretrained at
    rope_theta: float = 10000.0
    rope_factor: float = 40.0         # YaRN scale factor
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def check(self, where: str = "", name=lambda k: k, fix: str = "") -> "ModelArgs":
        """Every field's type and range, and the relations between fields, whatever the source
        (presets and flags: get_args; nanoK2 folders: from_config; HF folders: hf.config_to_args).
        A ValueError of one line: `where` (the file, or "" for flags), the field as that source
        spells it (`name(field)`), the value, and the fix. Ints in float fields become floats."""
        def bad(k, want):
            return ValueError(f"{where}{name(k)} must be {want}, got {getattr(self, k)!r}{fix}")
        for f in fields(self):
            k, v = f.name, getattr(self, f.name)
            if f.type is bool and not isinstance(v, bool):
                raise bad(k, "true or false")
            if f.type is int and not (isinstance(v, int) and not isinstance(v, bool)):
                raise bad(k, "an integer")
            if f.type is float:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise bad(k, "a number")
                if not math.isfinite(v):
                    raise bad(k, "a finite number")
                setattr(self, k, float(v))
            if f.type is int and not (0 if k in AT_LEAST_0 else 1) <= v <= MAX_SIZE:
                raise bad(k, f"at most {MAX_SIZE:,}" if v > 0 else f"at least {0 if k in AT_LEAST_0 else 1}")
            if f.type is float and k in AT_LEAST_0 and not v >= 0:
                raise bad(k, "at least 0")
            if f.type is float and k not in AT_LEAST_0 and not v > (1 if k == "rope_theta" else 0):
                raise bad(k, "greater than 1" if k == "rope_theta" else "positive")
        E, G = self.n_routed_experts, self.n_expert_groups
        for k, most in (("n_activated_experts", "n_routed_experts"), ("n_limited_groups", "n_expert_groups"),
                        ("n_dense_layers", "n_layers")):
            if getattr(self, k) > getattr(self, most):
                raise ValueError(f"{where}{name(k)} {getattr(self, k)} exceeds {name(most)} {getattr(self, most)}; "
                                 f"lower the one or raise the other{fix}")
        if E % G or (G > 1 and E // G < 2):  # (the group score is the sum of a group's top 2)
            raise ValueError(f"{where}{name('n_routed_experts')} {E} does not split into {name('n_expert_groups')} "
                             f"{G} groups of 2 or more experts; pick a divisor{fix}")
        if self.n_activated_experts > self.n_limited_groups * (E // G):
            raise ValueError(f"{where}{name('n_activated_experts')} {self.n_activated_experts} exceeds the "
                             f"{self.n_limited_groups * (E // G)} experts of the {name('n_limited_groups')} "
                             f"{self.n_limited_groups} groups routing keeps; lower it or keep more groups{fix}")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "even (RoPE rotates pairs of dims)")
        return self

    @classmethod
    def from_config(cls, saved, where: str) -> "ModelArgs":
        """A config file's model fields (a dict): all of them present, none unknown, each checked."""
        names = [f.name for f in fields(cls)]
        if not isinstance(saved, dict):
            raise ValueError(f"{where}model_args is not a JSON object; point at a folder written by train.py")
        unknown, missing = sorted(set(saved) - set(names)), [k for k in names if k not in saved]
        if unknown or missing:
            k = (unknown or missing)[0]
            raise ValueError(f"{where}model_args {'has the unknown field' if unknown else 'lacks the field'} "
                             f"{k!r}; it was not written by this version of train.py: restore the file, or "
                             f"{'remove' if unknown else 'add'} the field")
        return cls(**saved).check(where, lambda k: f"model_args.{k}",
                                  "; correct the file, or point at a folder written by train.py")


MAX_SIZE = 2**31 - 1  # the largest size (int field) a model may have
AT_LEAST_0 = {"n_dense_layers", "n_shared_experts", "q_lora_rank", "bias_update_speed", "aux_loss_alpha"}


PRESETS = {
    # tiny at half the depth (one dense layer, one MoE layer): `python train.py`'s 3-minute model,
    # which `bench.py quickstart` chose (RESULTS.md, "The quickstart search").
    "nano": dict(n_layers=2),
    # CPU-sized: trains in minutes on 2 cores. Small heads, 8 experts, top-2. The benchmarks' model.
    "tiny": dict(),
    # A laptop/GPU-sized model with the K2 proportions shrunk (64 experts, top-6).
    "small": dict(dim=768, inter_dim=2048, moe_inter_dim=256, n_layers=12, n_heads=12,
                  n_routed_experts=64, n_activated_experts=6, route_scale=2.446,
                  q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                  v_head_dim=64, max_seq_len=1024, rope_theta=50000.0),
    # The released Kimi-K2 config (1.03T total, 32.9B activated). Like deepseek-v3 below, it is the
    # inference config: YaRN on, as released. K2 pretrained at 4k with plain RoPE and was extended
    # later, so train.py turns YaRN off unless --yarn is passed.
    "kimi-k2": dict(vocab_size=163840, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
                    n_dense_layers=1, n_heads=64, n_routed_experts=384, n_shared_experts=1,
                    n_activated_experts=8, route_scale=2.827, aux_loss_alpha=0.0,
                    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128, max_seq_len=131072, yarn=True, original_seq_len=4096,
                    rope_theta=50000.0, rope_factor=32.0, beta_fast=1, beta_slow=1, mscale=1.0),
    # DeepSeek-V3 (671B total), for comparison: grouped routing, 3 dense layers, 128 heads.
    "deepseek-v3": dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048,
                        n_layers=61, n_dense_layers=3, n_heads=128, n_routed_experts=256,
                        n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                        n_limited_groups=4, route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        max_seq_len=16384, yarn=True, original_seq_len=4096, rope_theta=10000.0,
                        rope_factor=40.0, beta_fast=32, beta_slow=1, mscale=1.0),
}


def get_args(preset: str = "tiny", name=lambda k: k, **overrides) -> ModelArgs:
    """A preset with some fields overridden; unknown names are errors, not silently ignored.
    Checked (ModelArgs.check); `name`: how the caller's user spells a field (train.py: its flag)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(ModelArgs)}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise ValueError(f"unknown model field(s) {bad}; ModelArgs has {sorted(names)}")
    return ModelArgs(**{**PRESETS[preset], **overrides}).check(name=name)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Every ModelArgs field as a flag (--dim 128 --n-layers 2 ...), None meaning the preset's value;
    read back by args_from_flags. Not vocab_size (always the tokenizer's) and not yarn (its own flag:
    kimi-k2 and deepseek-v3 are the released inference configs, YaRN on, but K2 pretrained with plain
    RoPE at 4k and was extended later, and a training run does the same)."""
    g = p.add_argument_group("model overrides (default: the preset's value)")
    for f in fields(ModelArgs):
        if f.name not in ("vocab_size", "yarn"):
            g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    g.add_argument("--yarn", action="store_true",
                   help="YaRN RoPE (context extension); default: plain RoPE, whatever the preset says")


def args_from_flags(a, vocab_size: int) -> ModelArgs:
    """--preset with the flags of add_model_flags on top, checked, an error naming the flag; and
    --seq-len within the model's max_seq_len."""
    overrides = {f.name: getattr(a, f.name) for f in fields(ModelArgs)
                 if f.name != "vocab_size" and getattr(a, f.name) is not None}
    margs = get_args(a.preset, name=lambda k: "--" + k.replace("_", "-"), vocab_size=vocab_size, **overrides)
    if a.seq_len > margs.max_seq_len:
        raise ValueError(f"--seq-len {a.seq_len} exceeds the model's max_seq_len "
                         f"{margs.max_seq_len}; pass --max-seq-len {a.seq_len} or a shorter --seq-len")
    return margs


# ----------------------------------------------------------------------------- command lines

def check_flags(a, at_least: dict | None = None, positive=(), fractions=(), most: dict | None = None):
    """Bad input on a command line, before any work. Each flag, by attribute name (None is skipped,
    a list is checked item by item): at least its minimum and at most 2**63 - 1 or finite
    (`most` overrides: a seed may take what torch.Generator takes); `positive` in (0, inf);
    `fractions` at most 1. A ValueError names the flag and its value."""
    def flag(k):
        return "--" + k.replace("_", "-")

    def items(k):
        v = getattr(a, k)
        return [] if v is None else v if isinstance(v, list) else [v]

    for k, low in (at_least or {}).items():
        top = (most or {}).get(k, 2**64 - 1 if k == "seed" else 2**63 - 1)
        for v in items(k):
            if not v >= low:  # (NaN fails too)
                raise ValueError(f"{flag(k)} must be at least {low}, got {v}")
            if not v <= top:  # (a float flag: inf)
                raise ValueError(f"{flag(k)} must be {f'at most {top}' if isinstance(v, int) else 'a finite number'}, got {v}")
    for k in positive:
        for v in items(k):
            if not 0 < v < math.inf:
                raise ValueError(f"{flag(k)} must be a positive number, got {v}")
    for k in fractions:
        for v in items(k):
            if v > 1:
                raise ValueError(f"{flag(k)} is a fraction: it must be at most 1, got {v}")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default, flags without a help text included; not a None default:
    the flag's help says what leaving it out does. The description keeps its own line breaks."""

    def _format_action(self, action):
        if action.help is None and action.default is not None and action.option_strings:
            action = copy.copy(action)  # (argparse prints no line for a flag without help)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parser(prog: str, description: str, **kw) -> argparse.ArgumentParser:
    """The ArgumentParser of a script, whose errors are one line that points at --help (no usage block)."""
    p = argparse.ArgumentParser(prog=prog, description=description, **kw)
    p.error = lambda message: p.exit(2, f"error: {message} (see: python {p.prog} --help)\n")
    return p


def run_cli(main, argv=None):
    """main(argv), with bad input (a ValueError or FileNotFoundError, whose message names the fix)
    as one line on stderr and exit status 2, not a traceback; under torchrun a rank other than 0
    says which it is."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as e:
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank not in (None, '0') else ''}: {e}", file=sys.stderr)
        sys.exit(2)
