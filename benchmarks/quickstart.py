"""bench.py quickstart: which train.py settings end lowest in the quickstart's wall time (issue 29).

The quickstart is `python train.py`: the nano preset on the stdlib, about 3 minutes on 2 cores,
with defaults this search chose (RESULTS.md, "The quickstart search"). Each candidate here is a
few train.py flags on top of those defaults (CANDIDATES; "baseline" is the defaults), run as a real
`python train.py` process with --time-budget: every candidate gets the same seconds of training
and spends them as its model, batch and lr allow (a smaller model steps faster and sees more
tokens). The score is the run's final val bits/byte, over the whole val split: the same stdlib
files and tokenizer for every candidate, cut into windows of the candidate's own --seq-len. Then
the best --top candidates run again with other seeds: their spread is the noise a gain must beat.

Equal wall time is only fair on an idle machine: every row records the load average after its
run. Give the runs the threads `python train.py` will have (--threads). A winner becomes a default
through its steps done, as --max-steps (a time budget is not reproducible; a step count is).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import train
from benchmarks.common import check_flags, print_table, write_json
from benchmarks.optim_claims import mean_std

# One change from the defaults each, so that each row answers one question; a second round builds
# on the winners with --train-flags (a base every candidate adds to).
CANDIDATES = {
    "baseline": [],                                   # train.py as it is
    # lr and the WSD schedule
    "lr-5e-3": ["--lr", "5e-3"],                      # optim-match's best MuonClip lr at these sizes
    "lr-8e-3": ["--lr", "8e-3"],                      # beyond it: is the optimum higher for a short run?
    "warmup-5": ["--warmup-steps", "5"],              # default: 5% of the steps
    "decay-0.5": ["--decay-frac", "0.5"],             # a longer cooldown (default: the last 30%)
    "min-lr-0": ["--min-lr-frac", "0"],               # decay to zero (default: to 10% of the peak)
    # batch and context (default: 8 x 256 tokens a step, the first 75% of steps as 32 x 64)
    "no-short": ["--short-seq-frac", "0"],            # every step at 256-token windows
    "short-0.5": ["--short-seq-frac", "0.5"],         # switch to 256 at half the run
    "short-0.9": ["--short-seq-frac", "0.9"],         # switch late
    "short-1.0": ["--short-seq-frac", "1"],           # 64-token windows throughout (eval still at 256)
    "short-32": ["--short-seq-len", "32"],            # shorter windows still, 64 rows a step
    "seq-128": ["--seq-len", "128", "--batch-size", "16"],  # half the context at the same tokens a step
    "batch-4": ["--batch-size", "4"],                 # twice the steps, half the tokens each
    "batch-16": ["--batch-size", "16"],               # twice the tokens a step, half the steps
    # model shape, still the K2 layout: MLA with its latent, sigmoid-routed MoE + shared expert
    "layers-4": ["--n-layers", "4"],                  # the tiny preset's depth (one dense, three MoE)
    "dim-128": ["--dim", "128"],                      # a narrower stream, and a cheaper 8192-way head
    "heads-2": ["--n-heads", "2"],                    # half the attention width
    "experts-4": ["--n-routed-experts", "4"],         # fewer experts, each trained on more tokens
    "top-1": ["--n-activated-experts", "1"],          # half the routed compute per token
    "kv-rank-32": ["--kv-lora-rank", "32"],           # a smaller latent c
    # MuonClip (its QK-Clip at tau 100 never fires here: RESULTS.md's run peaked at a max logit of 18.9)
    "wd-0": ["--weight-decay", "0"],                  # no weight decay in a run this short
}
BASELINE = "baseline"
SEED = 1337  # train.py's default: the baseline's first run is `python train.py`'s own init and batches
TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
RUNS_DIR = os.path.join("out", "bench", "quickstart")  # one folder per run: train.log, metrics.jsonl
# what a run's folder keeps (the checkpoint, ~60 MB a run, goes: retrain the winner for weights)
KEPT = ("train.log", "metrics.jsonl", "config.json")
# a run's wall time beyond its budget (start-up, the final eval, the save), for the time estimate
# only: 22-26 s at 1 thread on a 2-core machine shared with another job
OVERHEAD_S = 20


def owned_flags(budget: float, seed: int, out_dir: str) -> list[str]:
    """The flags this benchmark sets on every run, last (they win): the budget decides the length
    (--max-steps only a cap no run reaches), one eval and one save, both at the end."""
    never = str(10**9)
    return ["--time-budget", str(budget), "--max-steps", never, "--seed", str(seed), "--out-dir", out_dir,
            "--eval-every", never, "--save-every", never, "--log-every", "50"]


OWNED = ("time_budget", "max_steps", "seed", "out_dir", "eval_every", "save_every", "log_every",
         "resume", "stop_at", "init_from")


# ----------------------------------------------------------------------------- the plan, checked

def plan_runs(a) -> tuple[dict[str, list[str]], list[str]]:
    """The candidates chosen ({name: flags}) and --train-flags split; every run's flags checked by
    train.py's own checks before the first run starts, so a bad one fails now, not an hour in."""
    names = list(CANDIDATES) if a.candidates == "all" else [n for n in a.candidates.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise ValueError(f"--candidates: unknown candidate(s) {unknown or [a.candidates]}; "
                         f"use 'all' or a comma list of {', '.join(CANDIDATES)}")
    try:
        extra = shlex.split(a.train_flags)
    except ValueError as e:
        raise ValueError(f"--train-flags {a.train_flags!r} is not a shell-quoted list of flags ({e})") from None
    defaults = vars(train.parse_args([]))

    def set_by(flags):  # the train.py settings a list of flags changes
        return {k for k, v in vars(train.parse_args(flags)).items() if v != defaults[k]}

    owned = sorted(set_by(extra) & set(OWNED))
    if owned:
        raise ValueError(f"--train-flags may not set --{owned[0].replace('_', '-')}: this benchmark sets it")
    chosen = {n: CANDIDATES[n] for n in dict.fromkeys(names)}
    for name, flags in chosen.items():
        both = sorted(set_by(flags) & set_by(extra))
        if both:
            raise ValueError(f"--train-flags sets --{both[0].replace('_', '-')}, which candidate {name} sets "
                             f"too; leave it out of --train-flags or of --candidates")
        try:
            train.check_args(train.parse_args(flags + extra + owned_flags(a.budget, SEED, RUNS_DIR)))
        except ValueError as e:
            raise ValueError(f"candidate {name} (with --train-flags): {e}") from None
    return chosen, extra


# ----------------------------------------------------------------------------- one run

def run_one(name: str, flags: list[str], extra: list[str], seed: int, a) -> dict:
    """One `python train.py` process in its own folder (cleared first) and its row: steps done,
    tokens seen, tokens/s over the budget it spent, final val loss and bpb, wall seconds (start-up
    and the final eval included), the load average after it. A failed run is a row with "error"."""
    run = name if seed == SEED else f"{name}-seed{seed}"
    out = os.path.join(RUNS_DIR, run)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    args = train.parse_args(flags + extra)
    row = {"candidate": name, "seed": seed, "flags": shlex.join(flags) or "(defaults)", "steps": None,
           "tokens": None, "tok_s": None, "val_loss": None, "val_bpb": None, "wall_s": None, "dir": out}
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}))
    t0 = time.time()
    try:
        with open(os.path.join(out, "train.log"), "w") as log:
            # generous: a cold cache first trains the tokenizer, outside the budget
            r = subprocess.run([sys.executable, TRAIN_PY, *flags, *extra, *owned_flags(a.budget, seed, out)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, timeout=a.budget + 1800)
        failed = f"exit status {r.returncode}" if r.returncode else None
    except subprocess.TimeoutExpired:
        failed = "timed out"
    row["wall_s"] = round(time.time() - t0, 1)
    row["load_1min"] = os.getloadavg()[0]
    last = _last_record(out)
    if failed or not last or "val_bpb" not in last:
        row["error"] = f"{failed or 'no final eval'}: {_last_line(os.path.join(out, 'train.log'))}"
    else:
        tokens = last["step"] * args.batch_size * args.seq_len
        row.update(steps=last["step"], tokens=tokens, tok_s=round(tokens / last["elapsed_s"]),
                   val_loss=last["val_loss"], val_bpb=last["val_bpb"], train_s=last["elapsed_s"])
    for f in os.listdir(out):
        if f not in KEPT:
            p = os.path.join(out, f)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return row


def _last_record(out: str) -> dict | None:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def _progress(i: int, n: int, row: dict, budget: float) -> str:
    run = row["candidate"] + ("" if row["seed"] == SEED else f" (seed {row['seed']})")
    if "error" in row:
        return f"[{i}/{n}] {run}: failed ({row['error']}); see {row['dir']}/train.log"
    return (f"[{i}/{n}] {run}: {row['steps']} steps, {row['tokens'] / 1e3:.0f}k tokens, {row['tok_s']} tok/s, "
            f"val {row['val_loss']:.4f} ({row['val_bpb']:.4f} bpb), {row['wall_s']:.0f} s wall "
            f"for {budget:g} s of training")


# ----------------------------------------------------------------------------- the search

def by_bpb(rows: list[dict]) -> list[dict]:
    """Best first; failed runs last, in their order."""
    return sorted(rows, key=lambda r: (r["val_bpb"] is None, r["val_bpb"] or 0))


def noise_rows(first: list[dict], reruns: list[dict]) -> list[dict]:
    """Per rerun candidate: its val bpb over all its seeds (the first run's included), mean and
    sample standard deviation, and the range."""
    rows = []
    for name in dict.fromkeys(r["candidate"] for r in reruns):
        bpbs = [r["val_bpb"] for r in first + reruns if r["candidate"] == name and r["val_bpb"] is not None]
        mean, sd = mean_std(bpbs)
        rows.append({"candidate": name, "seeds": len(bpbs), "bpb_mean": mean, "bpb_sd": sd,
                     "bpb_min": min(bpbs), "bpb_max": max(bpbs)})
    return rows


def bench_quickstart(a):
    """Each candidate a real train.py run with --time-budget; ranked by final val bpb; the top
    --top again with --seeds seeds in all, for the noise."""
    check_flags(a, at_least={"top": 0, "seeds": 1, "threads": 1}, positive=("budget",))
    chosen, extra = plan_runs(a)
    n_runs = len(chosen) + min(a.top, len(chosen)) * (a.seeds - 1)
    print(f"quickstart: {len(chosen)} candidates x {a.budget:g} s of training, then the top {a.top} with "
          f"{a.seeds} seeds each: {n_runs} runs, about {n_runs * (a.budget + OVERHEAD_S) / 60:.0f} min; "
          f"threads {a.threads or 'default'}")
    i = 0

    def run(name, seed):
        nonlocal i
        i += 1
        row = run_one(name, chosen[name], extra, seed, a)
        print(_progress(i, n_runs, row, a.budget), flush=True)
        return row

    rows = [run(name, SEED) for name in chosen]
    top = [r["candidate"] for r in by_bpb(rows)[:a.top] if r["val_bpb"] is not None]
    reruns = [run(name, SEED + k) for name in top for k in range(1, a.seeds)]
    noise = noise_rows(rows, reruns) if reruns else []

    print(f"\n{a.budget:g} s of training each (+ start-up and the final eval on the whole val split: wall_s); "
          f"seed {SEED}; sorted by val bpb")
    print_table(by_bpb(rows), ["candidate", "flags", "steps", "tokens", "tok_s", "val_loss", "val_bpb", "wall_s"])
    if noise:
        print(f"\nseed noise, the top {len(noise)}: val bpb over seeds {SEED}..{SEED + a.seeds - 1}")
        print_table(noise, ["candidate", "seeds", "bpb_mean", "bpb_sd", "bpb_min", "bpb_max"])
    base = next((r for r in rows if r["candidate"] == BASELINE and r["val_bpb"] is not None), None)
    best = by_bpb(rows)[0]
    if base and best["val_bpb"] is not None:
        print(f"best: {best['candidate']} at {best['val_bpb']:.4f} bpb in {best['steps']} steps "
              f"({best['val_bpb'] - base['val_bpb']:+.4f} vs the baseline's {base['val_bpb']:.4f})")
    write_json("quickstart", {"budget_s": a.budget, "threads": a.threads, "train_flags": extra, "seed": SEED,
                              "candidates": chosen, "rows": rows, "reruns": reruns, "noise": noise,
                              "args": vars(a) | {"fn": None}})


def add_parser(sub):
    q = sub.add_parser("quickstart", help=bench_quickstart.__doc__)
    q.add_argument("--budget", type=float, default=160,
                   help="seconds of training per run; wall_s adds start-up and the final eval, and the "
                        "sum is what must fit the quickstart's 3 minutes")
    q.add_argument("--candidates", default="all", help=f"'all' or a comma list of: {', '.join(CANDIDATES)}")
    q.add_argument("--top", type=int, default=3, help="how many of the best run again with other seeds")
    q.add_argument("--seeds", type=int, default=2, help="seeds per rerun candidate in all (1: no reruns)")
    q.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of each run (default: the environment's, as `python train.py`)")
    q.add_argument("--train-flags", default="",
                   help="train.py flags added to every run: a corpus, or a base from an earlier round")
    q.set_defaults(fn=bench_quickstart)
