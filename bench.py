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


# ----------------------------------------------------------------------------- optim

def _train_run(flags: list[str], out_dir: str) -> list[dict]:
    """One real `train.py` run (same loop users run); returns its metrics.jsonl records."""
    import train
    train.main(flags + ["--out-dir", out_dir])
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def bench_optim(a):
    """AdamW vs MuonClip on the tiny preset: same seed, data and tokens, each at the best lr of a
    small sweep; then QK-Clip on a run made to grow its logits (high lr, no decay, small tau)."""
    import tempfile
    common = ["--preset", a.preset, "--max-steps", str(a.steps), "--batch-size", str(a.batch_size),
              "--seq-len", str(a.seq_len), "--seed", str(a.seed), "--eval-every", str(a.steps),
              "--log-every", str(max(1, a.steps // 4)), "--save-every", str(10**9), "--no-compile"]
    tmp = tempfile.mkdtemp(prefix="bench-optim-")
    runs = []
    for opt, lrs in (("adamw", a.adamw_lrs), ("muonclip", a.muon_lrs)):
        for lr in lrs:
            recs = _train_run(common + ["--optimizer", opt, "--lr", str(lr)], os.path.join(tmp, f"{opt}-{lr}"))
            steady = recs[1:]  # the first step pays one-off costs
            runs.append({"optimizer": opt, "lr": lr, "val_loss": recs[-1]["val_loss"],
                         "val_bpb": recs[-1]["val_bpb"],
                         "opt_frac_of_step": sum(r["opt_ms"] for r in steady) / sum(r["ms"] for r in steady),
                         "max_logit": max((r["max_logit"] for r in recs if "max_logit" in r), default=None),
                         "tok_s": sum(r["tok_s"] for r in steady) / len(steady)})
    best = {o: min((r for r in runs if r["optimizer"] == o), key=lambda r: r["val_loss"]) for o in ("adamw", "muonclip")}
    for r in runs:
        r["best"] = "*" if r is best[r["optimizer"]] else ""
    print(f"\nsweep: {a.steps} steps x {a.batch_size} x {a.seq_len} tokens each; * = best lr "
          f"(picked on the same val split it is reported on)")
    print_table(runs, ["optimizer", "lr", "val_loss", "val_bpb", "opt_frac_of_step", "max_logit", "tok_s", "best"])
    gap = best["muonclip"]["val_loss"] - best["adamw"]["val_loss"]
    print(f"tuned MuonClip - tuned AdamW: {gap:+.4f} val loss")

    demo = {}
    demo_flags = common[:] + ["--optimizer", "muonclip", "--lr", str(a.demo_lr), "--weight-decay", "0"]
    demo_flags[demo_flags.index("--max-steps") + 1] = str(a.demo_steps)
    demo_flags[demo_flags.index("--eval-every") + 1] = str(a.demo_steps)
    for name, extra in (("no_clip", ["--no-qk-clip"]), ("clip", ["--qk-clip-tau", str(a.demo_tau)])):
        recs = _train_run(demo_flags + extra, os.path.join(tmp, f"demo-{name}"))
        demo[name] = {"max_logit": [r["max_logit"] for r in recs],
                      "heads_clipped": [r["heads_clipped"] for r in recs], "val_loss": recs[-1]["val_loss"]}
    c, n = demo["clip"], demo["no_clip"]
    print(f"\nQK-Clip demo: lr {a.demo_lr}, weight decay 0, tau {a.demo_tau}, {a.demo_steps} steps")
    print("step  max logit (no clip)  max logit (clip)  heads clipped")
    for i in range(0, a.demo_steps, max(1, a.demo_steps // 16)):
        print(f"{i + 1:4d}  {n['max_logit'][i]:19.2f}  {c['max_logit'][i]:16.2f}  {c['heads_clipped'][i]:13d}")
    over = [m / a.demo_tau for m in c["max_logit"] if m > a.demo_tau]
    print(f"peak max logit: {max(n['max_logit']):.2f} without the clip, {max(c['max_logit']):.2f} with it; "
          f"{sum(c['heads_clipped'])} head clips; val loss {n['val_loss']:.4f} / {c['val_loss']:.4f}.\n"
          f"The clip uses the logits of the forward before the update it follows, so a head can "
          f"re-enter a step above tau by that step's own growth: worst {max(over, default=1):.3f} x tau.")
    _plot_demo(demo, a.demo_tau)
    write_json("optim", {"sweep": runs, "gap_val_loss": gap, "demo": demo, "args": vars(a) | {"fn": None}})


def _plot_demo(demo, tau):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    plt.figure(figsize=(6, 3.5))
    for name, d in demo.items():
        plt.plot(range(1, len(d["max_logit"]) + 1), d["max_logit"], label=name.replace("_", " "))
    plt.axhline(tau, ls="--", c="gray", label=f"tau = {tau}")
    plt.xlabel("step"), plt.ylabel("max attention logit"), plt.legend(), plt.tight_layout()
    os.makedirs("out/bench", exist_ok=True)
    plt.savefig("out/bench/optim_max_logit.png", dpi=120)
    print("wrote out/bench/optim_max_logit.png")


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
    o = sub.add_parser("optim", help=bench_optim.__doc__)
    o.add_argument("--preset", default="tiny")
    o.add_argument("--steps", type=int, default=150)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--seq-len", type=int, default=128)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    o.add_argument("--muon-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    o.add_argument("--demo-steps", type=int, default=80)
    o.add_argument("--demo-lr", type=float, default=3e-2)
    o.add_argument("--demo-tau", type=float, default=10.0)
    o.set_defaults(fn=bench_optim)
    k = sub.add_parser("kernels", help="Triton kernels vs torch references")
    k.set_defaults(fn=lambda a: __import__("kernels").bench_kernels())
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
