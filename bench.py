"""Benchmarks (not tests): each prints a table and writes JSON to out/bench/<name>.json.

    python bench.py train     tokens/s of a tiny-preset training step, eager vs compiled, and MFU
    python bench.py optim     AdamW vs MuonClip at equal tokens; the QK-Clip demonstration
    python bench.py kv        KeepKV and baselines: quality vs budget; decode throughput and bytes
    python bench.py kernels   Triton kernels vs their torch references (GPU; interpreter on CPU)
    python bench.py dist      tokens/s with 1 and 2 processes (FSDP2), optimizer and communication share

Machines are noisy: every ratio here is measured side by side within one run.
"""
import argparse
import json
import os
import platform
import sys
import time

import math

import numpy as np
import torch
import torch.nn.functional as F

import data
import keepkv
from checkpoint import load_pretrained
from model import build_model, get_args


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


# ----------------------------------------------------------------------------- kv
# Quality: fixed windows of the validation split, each cut into a prompt (the model's context minus
# --kv-new tokens) and a teacher-forced continuation. The prompt is prefilled and compressed to the
# budget, then every continuation token is decoded one at a time through the compressed cache (one
# merge or eviction per token). Against the full cache on the same windows we report the NLL
# increase, top-1 agreement, and the relative change of the attention output at the steps where an
# entry left (||o_after - o_before|| / ||o_before||, per head, over layers). Then the EMA alpha and
# the observation window are swept for keepkv at budget 0.1.
#
# Throughput: a random-weights model with a long context (quality irrelevant), a 4096-token prompt:
# decode tokens/s and cache bytes for the full cache and keepkv at 0.1 at batch 8, and for keepkv at
# the larger batch its smaller cache allows in the same memory (the paper's "more than 2x"), in one run.

COMPRESSING = [p for p in keepkv.POLICIES if p != "full"]


def add_kv_args(p: argparse.ArgumentParser):
    p.add_argument("--kv-ckpt", default="out", help="checkpoint folder (train.py's output)")
    p.add_argument("--kv-data", default=None, help="corpus the checkpoint was trained on (default: stdlib)")
    p.add_argument("--kv-val-frac", type=float, default=0.05)
    p.add_argument("--kv-windows", type=int, default=64, help="validation windows for the quality part")
    p.add_argument("--kv-batch", type=int, default=8)
    p.add_argument("--kv-new", type=int, default=32, help="teacher-forced tokens after each prompt")
    p.add_argument("--kv-budgets", default="0.05,0.1,0.2,0.5")
    p.add_argument("--kv-policies", default=",".join(COMPRESSING))
    p.add_argument("--kv-alphas", default="0,0.5,0.8,0.9,0.95", help="sweep (keepkv, budget 0.1)")
    p.add_argument("--kv-obs-windows", default="4,64", help="sweep (keepkv, budget 0.1)")
    p.add_argument("--kv-thresholds", default="0.5,0.9", help="sweep (keepkv, budget 0.1)")
    p.add_argument("--kv-tp-prompt", type=int, default=4096)
    p.add_argument("--kv-tp-batch", type=int, default=8)
    p.add_argument("--kv-tp-steps", type=int, default=32)
    p.add_argument("--kv-tp-max-batch", type=int, default=64, help="cap on the same-memory batch")
    p.add_argument("--kv-compile", action="store_true", help="compile the decode step (throughput part)")
    p.add_argument("--kv-skip", default="", help="comma list of parts to skip: quality, sweep, throughput")
    p.add_argument("--kv-out", default="out/bench/kv.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _floats(s):
    return [float(x) for x in s.split(",") if x]


def val_tokens(enc, data_path, val_frac):
    """The validation split, encoded with the checkpoint's own tokenizer (documents joined by EOT)."""
    root, rel = data.list_files(data_path)
    _, val_docs = data.read_splits(root, rel, val_frac)
    ids = []
    for i, doc in enumerate(enc.encode_ordinary_batch(val_docs)):
        ids += ([enc.eot_token] if i else []) + doc
    return np.asarray(ids, dtype=np.int64)


@torch.no_grad()
def continuation(model, x, P, cfg):
    """Prefill x[:, :P] into a compressed cache, then decode x[:, P:] one token at a time.
    Returns the logits of the decoded steps [B, n, V] and the caches' merge statistics."""
    B, n = x.shape[0], x.shape[1] - P
    caches = keepkv.make_caches(model, B, P, cfg, max_new_tokens=n, track=True)
    model(x[:, :P], torch.arange(P, device=x.device), caches)
    out = [model(x[:, t:t + 1], torch.tensor([t], device=x.device), caches)[:, 0] for t in range(P, P + n)]
    return torch.stack(out, 1), keepkv.cache_stats(caches)


def evaluate(model, batches, P, cfg, ref=None):
    """NLL of the continuation; with a reference (the full cache's run) also its deltas."""
    nll, top1, agree, stats = [], [], [], []
    for i, (x, y) in enumerate(batches):
        logits, st = continuation(model, x, P, cfg)
        nll.append(F.cross_entropy(logits.flatten(0, 1), y[:, P:].flatten(), reduction="none"))
        top1.append(logits.argmax(-1).flatten())
        if ref is not None:
            agree.append((top1[-1] == ref["top1"][i]).float())
        stats.append(st)
    nll = torch.cat(nll)
    row = {"nll": nll.mean().item(), "top1": top1}
    if ref is not None:
        tot = {k: sum(s[k] for s in stats) for k in ("removals", "merges", "fallbacks")}
        mean = lambda k, w: sum(s[k] * s[w] for s in stats) / max(tot[w], 1)  # noqa: E731
        row.update(dnll=row["nll"] - ref["nll"], top1_agree=torch.cat(agree).mean().item(),
                   perturbation=mean("perturbation", "removals"),
                   perturbation_merged=mean("perturbation_merged", "merges"),
                   merge_frac=tot["merges"] / max(tot["removals"], 1),
                   prefill_merge_frac=sum(s["prefill_merge_frac"] for s in stats) / len(stats),
                   fallback_frac=tot["fallbacks"] / max(tot["merges"], 1))
    return row


def _row(cfg, P, r):
    return {"policy": cfg.policy, "budget": cfg.budget, "alpha": cfg.alpha, "obs_window": cfg.obs_window,
            "threshold": cfg.threshold, "capacity": keepkv.capacity(P, cfg),
            **{k: v for k, v in r.items() if k != "top1"}}


def quality(args, log):
    model = load_pretrained(args.kv_ckpt, args.device).eval()
    enc = data.load_encoding(args.kv_ckpt)
    T = model.args.max_seq_len
    P = T - args.kv_new
    if P < 16:
        raise ValueError(f"--kv-new {args.kv_new} leaves a {P}-token prompt in a {T}-token context")
    tokens = val_tokens(enc, args.kv_data, args.kv_val_frac)
    n_batches = math.ceil(args.kv_windows / args.kv_batch)
    batches = [(x.to(args.device), y.to(args.device))
               for x, y in data.eval_batches(tokens, args.kv_batch, T, n_batches)]
    n_win = sum(x.shape[0] for x, _ in batches)
    log(f"kv quality: {n_win} val windows of {T} tokens: {P}-token prompt + {args.kv_new} teacher-forced")
    ref = evaluate(model, batches, P, keepkv.KVConfig(policy="full"))
    log(f"  full cache: NLL {ref['nll']:.4f}")
    out = {"checkpoint": os.path.abspath(args.kv_ckpt), "context": T, "prompt_len": P,
           "new_tokens": args.kv_new, "windows": n_win, "nll_full": ref["nll"], "rows": [], "sweep": []}
    if "quality" not in args.kv_skip:
        for budget in _floats(args.kv_budgets):
            for policy in args.kv_policies.split(","):
                cfg = keepkv.KVConfig(policy=policy, budget=budget)
                r = _row(cfg, P, evaluate(model, batches, P, cfg, ref))
                out["rows"].append(r)
                log(f"  {policy:9s} budget {budget:<4g} (C={r['capacity']:3d}): dNLL {r['dnll']:+.4f}  "
                    f"top1 {r['top1_agree']:.3f}  perturb {r['perturbation']:.2e} (merges "
                    f"{r['perturbation_merged']:.2e})  merged {r['merge_frac']:.2f}")
    if "sweep" not in args.kv_skip:  # one knob at a time around the defaults, keepkv at budget 0.1
        base = keepkv.KVConfig()
        knobs = [{"alpha": a} for a in _floats(args.kv_alphas)] + \
                [{"obs_window": int(w)} for w in _floats(args.kv_obs_windows)] + \
                [{"threshold": t} for t in _floats(args.kv_thresholds)] + \
                [{"policy": "convex", "alpha": 0.0}]  # exact predictions: what ZIP alone removes
        for knob in knobs:
            cfg = keepkv.KVConfig(**{"policy": "keepkv", "budget": 0.1, **knob})
            label = ", ".join(f"{k} = {v:g}" if isinstance(v, (int, float)) else v
                              for k, v in knob.items())
            default = all(getattr(base, k) == v for k, v in knob.items())
            r = {"setting": label, "default": default, **_row(cfg, P, evaluate(model, batches, P, cfg, ref))}
            out["sweep"].append(r)
            log(f"  keepkv 0.1 {label:22s}: dNLL {r['dnll']:+.4f}  top1 {r['top1_agree']:.3f}  "
                f"perturb {r['perturbation']:.2e} (merges {r['perturbation_merged']:.2e})  "
                f"merged {r['merge_frac']:.2f}  fallback {r['fallback_frac']:.2f}")
    return out


def fill_random(caches, prompt_len, gen):
    """Stand in for a prefill: live entries with random keys, values and scores. A decode step
    costs the same whatever the cache holds (shapes are static), and this skips a long prefill."""
    for c in caches:
        n = min(prompt_len, c.capacity)
        c.reset()
        for buf in (c.k, c.v):
            buf.copy_(torch.randn(buf.shape, generator=gen).to(buf))
        c.log_votes[..., :n] = 0.0
        c.score[..., :n] = torch.randn(c.score[..., :n].shape, generator=gen).to(c.score)
        c.pos[..., :n] = torch.arange(n, dtype=torch.int32, device=c.pos.device)
        c.prefilled = True


@torch.no_grad()
def throughput(args, log):
    """Decode tokens/s and cache bytes: full vs keepkv at 0.1 at the same batch, and keepkv at the
    larger batch whose compressed cache takes the full cache's memory (capped), in one run."""
    P, B, n = args.kv_tp_prompt, args.kv_tp_batch, args.kv_tp_steps
    margs = get_args("tiny", vocab_size=512, max_seq_len=P + n + 8)   # random weights, long context
    model = build_model(margs, args.device, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    step = lambda m, c, tok, pos: m(tok, pos, c)[:, -1]  # noqa: E731
    if args.kv_compile:
        step = torch.compile(step, fullgraph=True)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    res = {"prompt_len": P, "batch": B, "decode_steps": n, "compiled": args.kv_compile,
           "prefill": "skipped: caches filled with random entries (decode cost does not depend on them)"}

    def run(name, cfg, batch):
        caches = keepkv.make_caches(model, batch, P, cfg, max_new_tokens=n)
        fill_random(caches, P, gen)
        x = torch.randint(0, margs.vocab_size, (batch, n), generator=gen).to(args.device)
        for i in range(2):  # warm-up (and compile)
            step(model, caches, x[:, i:i + 1], torch.tensor([P + i], device=args.device))
        sync()
        t0 = time.perf_counter()
        for i in range(2, n):
            step(model, caches, x[:, i:i + 1], torch.tensor([P + i], device=args.device))
        sync()
        r = {"batch": batch, "tokens_per_s": batch * (n - 2) / (time.perf_counter() - t0),
             "cache_bytes": sum(c.nbytes() for c in caches), "capacity": caches[0].capacity}
        log(f"  {name:16s}: decode {r['tokens_per_s']:7.1f} tok/s at batch {batch:3d}, cache "
            f"{r['cache_bytes'] / 2**20:.1f} MiB ({r['capacity']} entries per head)")
        res[name] = r

    run("full", keepkv.KVConfig(policy="full"), B)
    run("keepkv@0.1", keepkv.KVConfig(budget=0.1), B)
    res["bytes_ratio"] = res["keepkv@0.1"]["cache_bytes"] / res["full"]["cache_bytes"]
    res["speedup_same_batch"] = res["keepkv@0.1"]["tokens_per_s"] / res["full"]["tokens_per_s"]
    big = min(int(B / res["bytes_ratio"]), args.kv_tp_max_batch)
    run("keepkv@0.1 big", keepkv.KVConfig(budget=0.1), big)
    res["speedup_big_batch"] = res["keepkv@0.1 big"]["tokens_per_s"] / res["full"]["tokens_per_s"]
    log(f"  keepkv@0.1 takes {res['bytes_ratio']:.1%} of the full cache's bytes (votes, scores and "
        f"positions included); tokens/s vs full: {res['speedup_same_batch']:.2f}x at batch {B}, "
        f"{res['speedup_big_batch']:.2f}x at batch {big} (cache memory <= full at batch {B})")
    return res


def markdown(res) -> str:
    """The README tables: NLL increase / top-1 agreement per policy and budget, the sweep, speed."""
    q, lines = res.get("quality") or {}, []
    if q.get("rows"):
        cap = {r["budget"]: r["capacity"] for r in q["rows"]}
        lines += [f"{q['windows']} val windows: a {q['prompt_len']}-token prompt compressed to C entries per "
                  f"head, then {q['new_tokens']} teacher-forced tokens (full-cache NLL {q['nll_full']:.3f}). "
                  "Cells: NLL increase / top-1 agreement with the full cache.", "",
                  "| policy | " + " | ".join(f"b = {b:g} (C = {c})" for b, c in cap.items()) + " |",
                  "|---|" + "---|" * len(cap)]
        for policy in dict.fromkeys(r["policy"] for r in q["rows"]):
            cells = {r["budget"]: f"{r['dnll']:+.3f} / {r['top1_agree']:.2f}"
                     for r in q["rows"] if r["policy"] == policy}
            lines.append(f"| {policy} | " + " | ".join(cells.get(b, "") for b in cap) + " |")
    if q.get("sweep"):
        lines += ["", "keepkv at b = 0.1, one setting changed at a time (* = the default; the last row is "
                  "convex merging with exact predictions): NLL increase / "
                  "top-1 agreement / mean attention-output change at merge steps", "",
                  "| setting | result |", "|---|---|"]
        lines += [f"| {r['setting']}{' *' if r['default'] else ''} | {r['dnll']:+.3f} / "
                  f"{r['top1_agree']:.2f} / {r['perturbation_merged']:.1e} |" for r in q["sweep"]]
    tp = res.get("throughput")
    if tp:
        full, same, big = tp["full"], tp["keepkv@0.1"], tp["keepkv@0.1 big"]
        lines += ["", f"Decode after a {tp['prompt_len']}-token prompt "
                  f"({'compiled' if tp['compiled'] else 'eager'}, {res['device']}): full cache "
                  f"{full['tokens_per_s']:.0f} tok/s at batch {tp['batch']}; keepkv@0.1 "
                  f"{same['tokens_per_s']:.0f} tok/s ({tp['speedup_same_batch']:.2f}x) at the same batch and "
                  f"{big['tokens_per_s']:.0f} tok/s ({tp['speedup_big_batch']:.2f}x) at batch {big['batch']}, "
                  f"where its cache still takes no more memory; at 0.1 the cache is "
                  f"{tp['bytes_ratio']:.1%} of the full cache's bytes (votes, scores, positions included)."]
    return "\n".join(lines)


def bench_kv(args, log=print):
    t0 = time.time()
    torch.manual_seed(0)
    res = {"device": args.device, "kv_config": keepkv.KVConfig().__dict__}
    if not ("quality" in args.kv_skip and "sweep" in args.kv_skip):
        try:
            res["quality"] = quality(args, log)
        except FileNotFoundError as e:
            log(f"kv quality: skipped, {e}")
            res["quality"] = {"skipped": str(e)}
    if "throughput" not in args.kv_skip:
        log(f"kv throughput: random-weights tiny model, prompt {args.kv_tp_prompt}, batch {args.kv_tp_batch}")
        res["throughput"] = throughput(args, log)
    res["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.kv_out)), exist_ok=True)
    with open(args.kv_out, "w") as f:
        json.dump(res, f, indent=1)
    table = markdown(res)
    if table:
        log("\n" + table)
    log(f"kv: wrote {args.kv_out} in {res['seconds']:.0f}s")
    return res


# ----------------------------------------------------------------------------- dist

# what a training step calls (not barrier: the bench's own step-start barrier is outside the timing)
COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_reduce", "all_to_all_single", "broadcast")


class BlockingCollectives:
    """Time every torch.distributed collective by making it blocking: each call (FSDP2's
    all-gathers and reduce-scatters, Muon's all_to_all, train.py's all-reduces) waits for its
    result before returning, and the wait is added to `seconds`. This removes any overlap of
    communication with compute, so the share it gives is what communication would cost unhidden."""

    def __init__(self, device):
        self.device, self.seconds, self.saved = device, 0.0, {}

    def __enter__(self):
        import torch.distributed as dist
        for name in COLLECTIVES:
            orig = self.saved[name] = getattr(dist, name)

            def timed(*args, _orig=orig, **kw):
                _sync(self.device)
                t0 = time.perf_counter()
                work = _orig(*args, **kw)
                if work is not None and hasattr(work, "wait"):
                    work.wait()
                _sync(self.device)
                self.seconds += time.perf_counter() - t0
                return work
            setattr(dist, name, timed)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        for name, orig in self.saved.items():
            setattr(dist, name, orig)


def dist_worker(a):
    """One rank of `bench.py dist` (launched by it, under torchrun or alone): timed train.py steps
    on random tokens, then the same steps with collectives made blocking and timed."""
    import parallel
    import train
    args = train.parse_args(["--preset", a.preset, "--batch-size", str(a.batch_size),
                             "--seq-len", str(a.seq_len), "--grad-clip", "1.0"])
    d, device = parallel.setup_distributed(args)
    use_compile = device.type == "cuda"
    margs = train.model_args_from(args, 8192)
    model = parallel.make_model(margs, d, device, args.seed, use_compile)
    optimizer = train.build_optimizer(model, args)
    model.set_record_max_logits(True)
    tokens = np.random.default_rng(0).integers(0, 8192, 1_000_000).astype(np.uint16)
    sampler = data.BatchSampler(tokens, args.batch_size, args.seq_len, seed=0, rank=d.rank, world_size=d.world)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(first, n):
        total = opt = 0.0
        for i in range(first, first + n):
            d.barrier()
            _sync(device)
            t0 = time.perf_counter()
            x, y = sampler.get_batch(i)
            train.forward_backward(model, x, y, args, device, autocast, d)
            opt += train.optimizer_step(model, optimizer, args, d)[1]
            _sync(device)
            total += time.perf_counter() - t0
        return total / n, opt / n

    run(0, a.warmup)
    step_s, opt_s = run(a.warmup, a.steps)
    with BlockingCollectives(device) as comm:
        blocking_s, _ = run(a.warmup + a.steps, a.steps)
    if d.main:
        row = {"ms_per_step": step_s * 1e3, "tok_s": args.batch_size * args.seq_len / step_s,
               "opt_frac": opt_s / step_s, "comm_frac": comm.seconds / a.steps / blocking_s,
               "blocking_ms": blocking_s * 1e3}
        if device.type == "cuda":
            peak = next((v for k, v in GPU_BF16_PEAK.items() if k in torch.cuda.get_device_name()), None)
            flops = train_flops_per_token(margs, args.seq_len) * row["tok_s"]
            row["mfu_vs_bf16_peak"] = flops / peak if peak else None
        with open(a.json, "w") as f:
            json.dump(row, f)
    d.close()


def bench_dist(a):
    """Tokens/s of a training step with 1 process and with FSDP2 over 1 and 2 ranks (CPU: gloo,
    one thread per process; the 2-thread single process is the same cores used the other way),
    the share of the step in the optimizer, and in communication (collectives made blocking)."""
    import subprocess
    import tempfile
    cuda = torch.cuda.is_available()
    if cuda:  # one GPU here: the single-GPU numbers, and FSDP2's overhead on one rank
        configs = [("1 GPU, no FSDP", 0, None), ("FSDP2, 1 rank", 1, None)]
    else:
        configs = [("1 process, 1 thread", 0, 1), ("1 process, 2 threads", 0, 2),
                   ("FSDP2, 1 rank x 1 thread", 1, 1), ("FSDP2, 2 ranks x 1 thread", 2, 1)]
    here = os.path.abspath(__file__)
    worker = ["dist-worker", "--preset", a.preset, "--batch-size", str(a.batch_size),
              "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc, threads in configs:
            out = os.path.join(tmp, f"{len(rows)}.json")
            launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={nproc}"] if nproc else [sys.executable])
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            print(f"running: {name} ...", flush=True)
            r = subprocess.run([*launch, here, *worker, "--json", out], env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            with open(out) as f:
                rows.append({"config": name, **json.load(f)})
    base = rows[0]["tok_s"]
    for r in rows:
        r["vs_first"] = r["tok_s"] / base
    print(f"\n{a.preset} preset, MuonClip, global batch {a.batch_size} x {a.seq_len}, "
          f"{a.steps} timed steps after {a.warmup}")
    print_table(rows, list(rows[-1]) if not cuda else list(rows[0]))
    write_json("dist", {"preset": a.preset, "batch_size": a.batch_size, "seq_len": a.seq_len,
                        "steps": a.steps, "rows": rows})


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
    kv = add_kv_args(sub.add_parser("kv", help="KeepKV and baselines: quality vs budget, throughput"))
    kv.set_defaults(fn=bench_kv)
    k = sub.add_parser("kernels", help="Triton kernels vs torch references")
    k.set_defaults(fn=lambda a: __import__("kernels").bench_kernels())
    for name, fn in (("dist", bench_dist), ("dist-worker", dist_worker)):
        dd = sub.add_parser(name, help=fn.__doc__.split("\n")[0])
        dd.add_argument("--preset", default="tiny")
        dd.add_argument("--batch-size", type=int, default=8)
        dd.add_argument("--seq-len", type=int, default=256)
        dd.add_argument("--steps", type=int, default=10)
        dd.add_argument("--warmup", type=int, default=3)
        if name == "dist-worker":
            dd.add_argument("--json", required=True)
        dd.set_defaults(fn=fn)
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
