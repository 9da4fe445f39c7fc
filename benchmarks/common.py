"""What every benchmark shares: JSON output with the machine's description, plain-text tables, the
FLOP counting and GPU peaks behind the MFU figures of `bench.py train` and `bench.py dist`, and the
KV benchmarks' row specs (`row_config`)."""
import json
import os
import platform

import torch

from config import check_flags  # noqa: F401  (the benchmarks' flags are checked as train.py's are)
import keepkv
from model import Transformer, count_params, get_args


def check_preset(preset: str, seq_len: int):
    """The preset exists (else get_args' ValueError) and its context holds --seq-len."""
    max_len = get_args(preset).max_seq_len
    if seq_len > max_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the {preset} preset's max_seq_len {max_len}; "
                         f"pass a shorter --seq-len")


def write_json(name: str, payload: dict, out_dir: str = "out/bench") -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    payload = {"machine": machine_info(), **payload}
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return path


def machine_info() -> dict:
    info = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict], cols: list[str]):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


# dense bf16 tensor-core peaks (no sparsity), for MFU on a GPU
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def train_flops_per_token(args, seq_len: int) -> float:
    """Useful FLOPs of one trained token: 6 per weight a token multiplies (2 forward, 4 backward),
    plus causal attention (q.k and p.v over on average seq_len/2 keys, times 3 for the backward).
    The embedding lookup is not a matmul; the QK-Clip max-logit pass is overhead, not counted."""
    with torch.device("meta"):
        model = Transformer(args)
    _, active = count_params(model)
    matmul_params = active - args.vocab_size * args.dim - sum(m.gate.bias.numel() for m in model.moe_layers())
    attn = 2 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * (seq_len / 2) * args.n_layers
    return 6 * matmul_params + 3 * attn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def row_config(spec: str, **overrides) -> keepkv.KVConfig:
    """A table row's config from 'policy[:field=value...]', e.g. 'keepkv:merge_at=none:alpha=0'
    (booleans: on/off, true/false, 1/0). A ValueError names an unknown field or a bad value."""
    policy, *sets = spec.split(":")
    kw = {}
    for s in sets:
        name, _, value = s.partition("=")
        if name not in keepkv.KVConfig.__dataclass_fields__ or name == "policy":
            raise ValueError(f"row {spec!r}: unknown KVConfig field {name!r}")
        default = getattr(keepkv.KVConfig, name)
        if isinstance(default, bool):
            if value.lower() not in ("on", "off", "true", "false", "1", "0"):
                raise ValueError(f"row {spec!r}: {name} takes on/off, got {value!r}")
            kw[name] = value.lower() in ("on", "true", "1")
        else:
            try:
                kw[name] = type(default)(value)
            except ValueError:
                kind = {int: "an integer", float: "a number"}.get(type(default), type(default).__name__)
                raise ValueError(f"row {spec!r}: {name}={value!r} is not {kind}") from None
    return keepkv.KVConfig(policy=policy, **{**kw, **overrides})
