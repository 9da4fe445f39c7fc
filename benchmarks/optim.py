"""bench.py optim: AdamW vs MuonClip at equal tokens. Each run is a real train.py run (tiny preset,
same seed and batches), each optimizer at the best lr of a small sweep; reported: val loss and
bits/byte, the optimizer's share of the step time, the max attention logit. The claim it checks:
MuonClip reaches a lower loss than AdamW for the same tokens (Moonlight/K2). Then the QK-Clip
demonstration: a run made to grow its logits (high lr, no weight decay, small tau) with and without
the clip, which must hold the max logit near tau."""
import json
import os

from benchmarks.common import check_flags, check_preset, print_table, write_json


def _train_run(flags: list[str], out_dir: str) -> list[dict]:
    """One real `train.py` run (same loop users run); returns its metrics.jsonl records. The run's
    folder (a checkpoint of ~60 MB for the tiny preset) is removed once read."""
    import shutil

    import train
    train.main(flags + ["--out-dir", out_dir])
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    shutil.rmtree(out_dir, ignore_errors=True)
    return recs


def run_flags(a, steps: int, seed: int) -> list[str]:
    """The train.py flags every benchmark run here shares: a.preset, a.batch_size, a.seq_len, `steps`
    steps evaluated once at the end (on the whole val split), no periodic saves, no compile, and
    the settings its results were measured with before the quickstart's defaults changed: every
    step at --seq-len (no sequence-length warmup) and the 8192-token BPE."""
    return ["--preset", a.preset, "--max-steps", str(steps), "--batch-size", str(a.batch_size),
            "--seq-len", str(a.seq_len), "--short-seq-frac", "0", "--vocab-size", "8192", "--seed", str(seed),
            "--eval-every", str(steps),
            "--log-every", str(max(1, steps // 4)), "--save-every", str(10**9), "--no-compile"]


def bench_optim(a):
    """AdamW vs MuonClip on the tiny preset: same seed, data and tokens, each at the best lr of a
    small sweep; then QK-Clip on a run made to grow its logits (high lr, no decay, small tau)."""
    import tempfile
    if a.share:
        return bench_optim_share(a)
    check_flags(a, at_least={"steps": 1, "batch_size": 1, "seq_len": 1, "seed": 0, "demo_steps": 1},
                positive=("adamw_lrs", "muon_lrs", "demo_lr", "demo_tau"))
    check_preset(a.preset, a.seq_len)
    common = run_flags(a, a.steps, a.seed)
    tmp = tempfile.mkdtemp(prefix="bench-optim-")  # each run's folder is removed once read
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
    demo_flags = run_flags(a, a.demo_steps, a.seed) + ["--optimizer", "muonclip", "--lr", str(a.demo_lr),
                                                        "--weight-decay", "0"]
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
    os.rmdir(tmp)  # (emptied run by run)
    write_json("optim", {"sweep": runs, "gap_val_loss": gap, "demo": demo, "args": vars(a) | {"fn": None}})


def bench_optim_share(a):
    """`bench.py optim --share`: the optimizer's share of a MuonClip training step, Newton-Schulz
    one matrix at a time (muonclip.muon_step_per_matrix_, the reference) against same-shape
    matrices batched (muon_step_, the default). One model, one batch, one optimizer whose path is
    switched between rounds, the order alternating, so both paths see the same weights and the
    same machine load; each path's figures are medians over its steps."""
    import time

    import numpy as np
    import torch

    import config
    import parallel
    import train
    check_flags(a, at_least={"batch_size": 1, "seq_len": 1, "seed": 0, "share_rounds": 1, "share_steps": 1})
    check_preset(a.preset, a.seq_len)
    args = train.parse_args(["--preset", a.preset, "--batch-size", str(a.batch_size),
                             "--seq-len", str(a.seq_len), "--seed", str(a.seed), "--no-compile"])
    d, device = parallel.setup_distributed(args)
    model = parallel.make_model(config.args_from_flags(args, 8192), d, device, args.seed, False)
    optimizer = train.build_optimizer(model, args)  # MuonClip at train.py's default lr
    model.set_record_max_logits(True)               # as train.py does for QK-Clip
    x, y = torch.from_numpy(np.random.default_rng(a.seed).integers(0, 8192, (2, a.batch_size, a.seq_len)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    paths = {"per-matrix": False, "batched": True}
    times = {p: [] for p in paths}  # (step s, optimizer s) per timed step

    def run(path, n):
        optimizer.batched_ns = paths[path]
        for _ in range(n):
            t0 = time.perf_counter()
            train.forward_backward(model, x, y, args, device, autocast, d)
            t_opt = train.optimizer_step(model, optimizer, args, d)[1]
            times[path].append((time.perf_counter() - t0, t_opt))

    for path in paths:  # warm-up, not kept
        run(path, 2)
        times[path].clear()
    for r in range(a.share_rounds):
        for path in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            run(path, a.share_steps)
    rows = []
    for path, ts in times.items():
        step, opt = np.array(ts).T
        rows.append({"ns_path": path, "step_ms": round(1e3 * float(np.median(step)), 1),
                     "opt_ms": round(1e3 * float(np.median(opt)), 1),
                     "opt_share": float(np.median(opt / step)), "steps": len(ts)})
    print(f"\n{a.preset} preset, MuonClip, batch {a.batch_size} x {a.seq_len}, {torch.get_num_threads()} "
          f"threads, {a.share_rounds} rounds of {a.share_steps} steps per path, interleaved; medians")
    print_table(rows, ["ns_path", "step_ms", "opt_ms", "opt_share", "steps"])
    print(f"optimizer time, per-matrix / batched: {rows[0]['opt_ms'] / rows[1]['opt_ms']:.2f}x")
    d.close()
    write_json("optim_share", {"rows": rows, "times_s": times, "args": vars(a) | {"fn": None}})


def _plot_demo(demo, tau):
    plot_panels("out/bench/optim_max_logit.png", [{
        "lines": [{"y": d["max_logit"], "label": name.replace("_", " ")} for name, d in demo.items()],
        "hlines": [(tau, f"tau = {tau}")]}], "step", "max attention logit")


def plot_panels(path: str, panels: list[dict], xlabel: str, ylabel: str):
    """One PNG of side-by-side panels, each {"title", "lines", "hlines", "logx"}: a line is
    {"y", "x" (default: steps 1..n), "label"} plus any matplotlib style keys (color, ls, marker);
    an hline is (y, label), drawn dashed. matplotlib is optional: without it, one line says so."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written to {path})")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(1 + 5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for line in panel["lines"]:
            style = {k: v for k, v in line.items() if k not in ("x", "y")}
            ax.plot(line.get("x", range(1, len(line["y"]) + 1)), line["y"], **style)
        for y, label in panel.get("hlines", []):
            ax.axhline(y, ls="--", c="gray", label=label)
        if panel.get("logx"):
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=panel.get("ylabel", ylabel), title=panel.get("title", ""))
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def add_parser(sub):
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
    o.add_argument("--share", action="store_true",
                   help="only the optimizer's share of a MuonClip step: per-matrix vs batched Newton-Schulz")
    o.add_argument("--share-rounds", type=int, default=6, help="--share: interleaved rounds per path")
    o.add_argument("--share-steps", type=int, default=3, help="--share: timed steps per round")
    o.set_defaults(fn=bench_optim)
