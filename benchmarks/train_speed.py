"""bench.py train: tokens/s of one training step (AdamW, random tokens) on the tiny preset (or on
the --setups given, side by side), eager vs every block compiled, and the FLOP/s that makes, as a
fraction of this machine's own 2048^3 GEMM rate (and, on a GPU, of its bf16 peak: MFU). The claim
it checks: whether torch.compile pays for the model on this device, which sets train.py's
--compile default (on for CUDA, off for CPU)."""
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (GPU_BF16_PEAK, _sync, check_flags, check_preset, print_table,
                               train_flops_per_token, write_json)
from model import build_model, get_args


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


def parse_setups(text: str) -> list[tuple[str, int, int, int]]:
    """--setups "tiny/8192/8x256,nano/4096/32x64" -> [(preset, vocab, batch, seq_len), ...]."""
    out = []
    for item in text.split(","):
        try:
            preset, vocab, shape = item.split("/")
            batch, seq = shape.split("x")
            out.append((preset, int(vocab), int(batch), int(seq)))
        except ValueError:
            raise ValueError(f"--setups item {item!r} is not PRESET/VOCAB/BATCHxSEQ, e.g. nano/4096/32x64") from None
    return out


def bench_train(a):
    check_flags(a, at_least={"batch_size": 1, "seq_len": 1, "steps": 1, "warmup": 0})
    setups = parse_setups(a.setups) if a.setups else [(a.preset, 8192, a.batch_size, a.seq_len)]
    for preset, vocab, batch, seq in setups:
        check_preset(preset, seq)
        if min(vocab, batch, seq) < 1:
            raise ValueError(f"--setups: vocab, batch and seq_len must be at least 1, got {vocab}, {batch}, {seq}")
    bad = [m for m in a.modes.split(",") if m not in ("eager", "compiled")]
    if bad:
        raise ValueError(f"--modes {a.modes!r}: unknown mode(s) {bad}; use eager, compiled or eager,compiled")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rate = matmul_rate(device, dtype)
    rows = []
    for preset, vocab, batch, seq in setups:
        args = get_args(preset, vocab_size=vocab)
        flops_tok = train_flops_per_token(args, seq)
        for mode in a.modes.split(","):
            row = {"setup": f"{preset}/{vocab}/{batch}x{seq}", "mode": mode,
                   **time_steps(args, mode, batch, seq, a.steps, a.warmup, device)}
            tok_s = row["tok_s"]
            row.update(mflop_per_token=flops_tok / 1e6, achieved_gflops=tok_s * flops_tok / 1e9,
                       frac_of_matmul_rate=tok_s * flops_tok / rate)
            if device.type == "cuda":
                peak = next((v for k, v in GPU_BF16_PEAK.items() if k in torch.cuda.get_device_name()), None)
                row["mfu_vs_bf16_peak"] = tok_s * flops_tok / peak if peak else None
            if mode == "compiled" and rows and rows[-1]["setup"] == row["setup"]:
                row["speedup_vs_eager"] = tok_s / rows[-1]["tok_s"]
            rows.append(row)
            print_table([row], list(row))
    print(f"\n{device} {dtype} matmul rate {rate / 1e9:.1f} GFLOP/s (2048^3 GEMM, same run)")
    print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    write_json("train", {"setups": [r["setup"] for r in rows], "matmul_flops": rate, "device": str(device),
                         "rows": rows})


def time_steps(args, mode, batch, seq, steps, warmup, device) -> dict:
    """ms and tokens/s of one AdamW training step on random tokens (after `warmup` untimed steps)."""
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
    for _ in range(warmup):
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    return {"ms_per_step": dt * 1e3, "tok_s": batch * seq / dt, "warmup_s": warm_s}


def add_parser(sub):
    t = sub.add_parser("train", help=bench_train.__doc__)
    t.add_argument("--preset", default="tiny")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--modes", default="eager,compiled")
    t.add_argument("--setups", default=None, help="rows to compare in one run, PRESET/VOCAB/BATCHxSEQ, "
                   "comma-separated (e.g. tiny/8192/8x256,nano/4096/32x64); default: --preset with the "
                   "8192-token vocabulary at --batch-size x --seq-len")
    t.set_defaults(fn=bench_train)
