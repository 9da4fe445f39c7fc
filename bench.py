"""Benchmarks (not tests): each prints a table and writes JSON to out/bench/<name>.json.

    python bench.py train     tokens/s of a tiny-preset training step, eager vs compiled, and MFU
    python bench.py optim     AdamW vs MuonClip at equal tokens; the QK-Clip demonstration
    python bench.py kv        KeepKV and baselines: quality vs budget; decode throughput and bytes
    python bench.py kernels   Triton kernels vs their torch references (GPU; interpreter on CPU)

Machines are noisy: every ratio here is measured side by side within one run.
"""
import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F


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


# ----------------------------------------------------------------------------- train

# dense bf16 tensor-core peaks (no sparsity), for MFU on a GPU
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def train_flops_per_token(args, seq_len: int) -> float:
    """Useful FLOPs of one trained token: 6 per weight a token multiplies (2 forward, 4 backward),
    plus causal attention (q.k and p.v over on average seq_len/2 keys, times 3 for the backward).
    The embedding lookup is not a matmul; the QK-Clip max-logit pass is overhead, not counted."""
    from model import build_model, count_params
    with torch.device("meta"):
        from model import Transformer
        model = Transformer(args)
    _, active = count_params(model)
    matmul_params = active - args.vocab_size * args.dim - sum(m.gate.bias.numel() for m in model.moe_layers())
    attn = 2 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * (seq_len / 2) * args.n_layers
    return 6 * matmul_params + 3 * attn


def matmul_rate(device, dtype, n=2048, reps=5) -> float:
    """This machine's own dense matmul FLOP/s: the denominator of an honest CPU "MFU"."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(a):
    from model import build_model, get_args
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = get_args(a.preset, vocab_size=8192)
    seq, batch = a.seq_len, a.batch_size
    flops_tok = train_flops_per_token(args, seq)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rate = matmul_rate(device, dtype)
    rows = []
    for mode in a.modes.split(","):
        torch.manual_seed(0)
        model = build_model(args, device, seed=0)
        model.set_record_max_logits(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if mode == "compiled":
            for layer in model.layers:
                layer.compile()
        x = torch.randint(0, args.vocab_size, (batch, seq), device=device)
        y = torch.randint(0, args.vocab_size, (batch, seq), device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step():
            with autocast:
                logits = model(x)
            F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.pop_max_logits()
            model.update_router_bias()

        t0 = time.perf_counter()
        for _ in range(a.warmup):
            step()
        _sync(device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        _sync(device)
        dt = (time.perf_counter() - t0) / a.steps
        tok_s = batch * seq / dt
        row = {"mode": mode, "ms_per_step": dt * 1e3, "tok_s": tok_s, "warmup_s": warm_s,
               "achieved_gflops": tok_s * flops_tok / 1e9,
               "frac_of_matmul_rate": tok_s * flops_tok / rate}
        if device.type == "cuda":
            peak = next((v for k, v in GPU_BF16_PEAK.items() if k in torch.cuda.get_device_name()), None)
            row["mfu_vs_bf16_peak"] = tok_s * flops_tok / peak if peak else None
        rows.append(row)
        print_table([row], list(row))
    if len(rows) == 2:
        rows[1]["speedup_vs_eager"] = rows[1]["tok_s"] / rows[0]["tok_s"]
    print(f"\n{a.preset} preset, batch {batch} x {seq}, {flops_tok / 1e6:.1f} MFLOP/token, "
          f"{device} {dtype} matmul rate {rate / 1e9:.1f} GFLOP/s (2048^3 GEMM, same run)")
    print_table(rows, list(rows[-1]))
    write_json("train", {"preset": a.preset, "batch_size": batch, "seq_len": seq,
                         "flops_per_token": flops_tok, "matmul_flops": rate, "device": str(device),
                         "rows": rows})


# ----------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help=bench_train.__doc__)
    t.add_argument("--preset", default="tiny")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--modes", default="eager,compiled")
    t.set_defaults(fn=bench_train)
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
