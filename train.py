"""Train a Kimi K2 model: `python train.py` trains the nano preset on the Python stdlib, on CPU.

The loop, top to bottom: parse flags -> load tokens -> build the model (on the meta device) ->
(resume) -> for each step: the batch (short windows first: sequence-length warmup), gradient
accumulation over micro-batches, lr from the WSD schedule (over --max-steps, or over the steps
that fit in --time-budget), clip, optimizer step, QK-Clip, router-bias update, one log line ->
periodic eval and checkpoints.
This file in that order: the schedule, one step, the validation loss, then `train()` (setup, then
the loop); the flags come last.

Two helpers keep this file to the loop:
  parallel.py    several processes: `torchrun --nproc_per_node=N train.py` (FSDP2). Each rank
                 reads its slice of every global batch, and the loss, QK-Clip's max logits and
                 the router loads are made global, so results do not depend on the rank count.
  checkpoint.py  what --out-dir holds (weights, tokenizer, train state, metrics.jsonl and each
                 step's log line), how a save survives a crash, and how --resume continues with
                 exactly the same losses.
"""
import argparse
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import data
import muonclip
from checkpoint import init_weights_from, load_checkpoint, save_checkpoint, save_when_due
from config import PRESETS, DefaultsHelpFormatter, add_model_flags, args_from_flags, check_flags, parser, run_cli
from model import count_params
from parallel import Dist, distributed, global_router_loads, make_model, rank_rows


# ----------------------------------------------------------------------------- schedule

def lr_multiplier(step: int, max_steps: int, warmup: int, decay_frac: float, min_frac: float) -> float:
    """Kimi K2's WSD schedule: linear warmup, a long constant stage, cosine decay to min_frac."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = max_steps - int(decay_frac * max_steps)
    if step < decay_start:
        return 1.0
    t = (step - decay_start) / max(1, max_steps - decay_start)
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))


def planned_steps(step: int, elapsed: float, budget: float, cap: int) -> int:
    """--time-budget: the run's length in steps, planned again at every step: this step, then as many
    more as fit in the seconds left at the mean step time so far, at most `cap`. The lr follows
    lr_multiplier over the plan, so the schedule keeps its shape whatever the machine's speed, and
    needs no special case for warmup or the last step (a plan of step + 1 makes this step the last)."""
    per_step = elapsed / (step + 1)
    return min(cap, step + 1 + max(0, int((budget - elapsed) / per_step)))


def window(step: int, max_steps: int, args) -> int:
    """Sequence-length warmup (Li et al. 2022, arXiv:2108.06084): the first --short-seq-frac of the
    steps train on --short-seq-len windows, the rest on --seq-len ones, at the same tokens per step.
    Short windows are cheaper and give more independent rows per batch; the long end teaches the
    positions that generate.py and posttrain.py use. Eval always scores --seq-len windows."""
    return args.short_seq_len if step < int(args.short_seq_frac * max_steps) else args.seq_len


def build_optimizer(model, args):
    """--optimizer at --lr (default: muonclip.DEFAULT_LR's), --weight-decay, QK-Clip at --qk-clip-tau."""
    tau = None if args.no_qk_clip else args.qk_clip_tau
    return muonclip.build_optimizer(model, args.optimizer, args.lr, args.weight_decay, tau)


# ----------------------------------------------------------------------------- one step

def forward_backward(model, x, y, args, device, autocast, d: Dist, stop: bool = False) -> tuple[float, bool]:
    """Accumulate the gradients of this rank's rows (x, y) over --grad-accum micro-batches.
    Then one all-reduce for what every rank must agree on: the loss (mean over ranks) and whether
    any rank got Ctrl-C (all must stop at the same step, or the others would wait forever)."""
    loss_sum = torch.zeros((), device=device)
    model.set_aux_loss_scale(1 / args.grad_accum)  # the balance loss, if on, is scaled like the LM loss
    for xm, ym in zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum)):
        with autocast:
            logits = model(xm.to(device))
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), ym.to(device).view(-1))
        (loss / args.grad_accum).backward()  # FSDP2 averages the gradients over ranks
        loss_sum += loss.detach()
    flag = torch.tensor(float(stop), device=device)  # on the device: nccl reduces only GPU tensors
    loss, stops = d.all_reduce(torch.stack([loss_sum.float() / args.grad_accum, flag])).tolist()
    return loss / d.world, stops > 0


def optimizer_step(model, optimizer, args, d: Dist) -> tuple[dict | None, float]:
    """Clip the gradient norm, step, then QK-Clip from the max logit of each head over the global
    batch and the router-bias rule from the global expert loads. Returns (clip stats or None,
    seconds spent from the optimizer step on)."""
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # global norm (DTensor)
    _sync(model)
    t0 = time.time()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clip_stats = None
    if isinstance(optimizer, muonclip.MuonClip):
        clip_stats = optimizer.qk_clip(d.all_reduce(model.pop_max_logits(), dist.ReduceOp.MAX))
    model.update_router_bias(global_router_loads(model, d))
    _sync(model)
    return clip_stats, time.time() - t0


def _sync(model):
    """Wait for queued GPU work, so a host timer measures the work itself."""
    if model.embed.weight.device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- eval

@torch.no_grad()
def validation_loss(model, ds, val_bytes, final: bool, args, device, autocast, d: Dist) -> dict:
    """val_loss (nats/token) and val_bpb over fixed windows of val: --eval-batches of them, or all
    at the last step (the bytes gzip and xz were measured on). Each rank scores its rows of every
    batch; the sums are all-reduced."""
    model.eval()
    total, count, ys = 0.0, 0, []
    max_batches = 10**9 if final else args.eval_batches
    for x, y in data.eval_batches(ds.val, args.batch_size // args.grad_accum, args.seq_len, max_batches):
        (xr, counted), (yr, _) = rank_rows(x, d), rank_rows(y, d)
        with autocast:
            logits = model(xr.to(device))
        if counted:
            total += F.cross_entropy(logits.view(-1, logits.shape[-1]), yr.to(device).view(-1),
                                     reduction="sum").item()
            count += yr.numel()
        ys.append(y)
    model.train()
    if d.enabled:
        total, count = d.all_reduce(torch.tensor([total, count], dtype=torch.float64, device=device)).tolist()
    loss = total / count
    n_bytes = len(val_bytes) if final else data.eval_bytes(ds.enc, torch.cat([y.flatten() for y in ys]))
    bpb = data.bits_per_byte(loss, sum(y.numel() for y in ys), n_bytes)
    return {"val_loss": round(loss, 5), "val_bpb": round(bpb, 4)}


# ----------------------------------------------------------------------------- the run

def train(args, d: Dist, device):
    log = print if d.main else (lambda *a, **k: None)  # only rank 0 prints and writes metrics
    torch.manual_seed(args.seed)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    os.makedirs(args.out_dir, exist_ok=True)
    if d.main:
        checkpoint.remove_partial(args.out_dir)  # what a save cut short left (a later save would too)

    with d.main_first():  # rank 0 trains the tokenizer and writes the token cache; the others read it
        ds = data.load_dataset(args.data, args.tokenizer, cache_dir=args.cache_dir,
                               vocab_size=args.vocab_size, verbose=d.main)
    log(f"data: {ds.name}")
    sampler = data.BatchSampler(ds.train, args.batch_size, args.seq_len, seed=args.seed,
                                rank=d.rank, world_size=d.world, copy_rows=args.copy_rows,
                                copy_steps=args.copy_steps)
    # the val bytes the final eval scores, and gzip and xz compress: computed once, and before the
    # model is built (they fail early if val is shorter than one window)
    val_bytes = data.window_bytes(ds.enc, [y for _, y in data.eval_batches(
        ds.val, args.batch_size // args.grad_accum, args.seq_len, 10**9)])
    baselines = data.compression_baselines(val_bytes)

    margs = args_from_flags(args, ds.vocab_size)
    model = make_model(margs, d, device, args.seed, use_compile)
    total, active = count_params(model)
    log(f"model: {args.preset} preset, {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), "
        f"device {device}, compile {use_compile}" + (f", FSDP2 over {d.world} ranks" if d.enabled else ""))
    optimizer = build_optimizer(model, args)
    log(f"optimizer: {muonclip.describe(optimizer)}")
    # QK-Clip's input (and logged even with --no-qk-clip)
    model.set_record_max_logits(isinstance(optimizer, muonclip.MuonClip))

    step = 0
    if args.init_from and not args.resume:   # on --resume the checkpoint's own weights win
        init_weights_from(model, args.init_from, margs, d)
        log(f"weights from {args.init_from}")
    if args.resume:
        step = load_checkpoint(args.out_dir, model, optimizer, sampler, args, margs, d)
        log(f"resumed from {args.out_dir} at step {step}")
        if step >= args.max_steps:
            log(f"nothing to train: the checkpoint is at step {step} and --max-steps is "
                f"{args.max_steps}; pass a larger --max-steps to train on")
            return None
    log(f"val: {len(val_bytes):,} bytes; gzip -9 {baselines['gzip-9']:.3f} bpb, xz -9 {baselines['xz-9']:.3f} bpb")

    # the loop; with --time-budget its clock starts here: the setup above and the final eval and save
    # (at the last step) are not counted, and max_steps is re-planned at every step
    max_steps = args.max_steps
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    stop_requested = []
    signal.signal(signal.SIGINT, lambda *_: stop_requested.append(True))  # finish the step, then save
    t_loop = t_start = time.time()  # t_start, first: the ETA's clock, restarted after a first step
    first = saved = step
    # metrics.jsonl, cut back to the checkpoint's step: a resumed run logs the steps after it again
    with checkpoint.MetricsLog(args.out_dir, step, d.main) as metrics:
        def save():
            nonlocal saved
            save_checkpoint(args.out_dir, model, optimizer, step, sampler, args, ds.enc, d)
            metrics.commit()
            saved = step
        while step < max_steps:
            t0 = time.time()
            x, y = sampler.get_batch(step, window(step, max_steps, args))  # this rank's rows of the global batch
            loss, stop = forward_backward(model, x, y, args, device, autocast, d, bool(stop_requested))
            if not math.isfinite(loss):
                kept = f"The last good checkpoint (step {saved}) in {args.out_dir} is kept" if saved else "No checkpoint was saved"
                log(f"step {step + 1}: loss is {loss}; stopping. {kept}; try a lower --lr.")
                sys.exit(1)
            if args.time_budget is not None:  # on the slowest rank's clock, so that all ranks plan alike
                elapsed = d.all_reduce(torch.tensor(time.time() - t_loop, device=device), dist.ReduceOp.MAX)
                max_steps = planned_steps(step, elapsed.item(), args.time_budget, args.max_steps)
            warmup = args.warmup_steps if args.warmup_steps is not None else max(1, max_steps // 20)
            mult = lr_multiplier(step, max_steps, warmup, args.decay_frac, args.min_lr_frac)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * mult
            lr = optimizer.param_groups[0]["lr"]
            clip_stats, t_opt = optimizer_step(model, optimizer, args, d)
            sampler.position = step + 1
            step += 1

            t_end = time.time()
            dt = t_end - t0
            if step == 1:  # the first step includes compilation: not in the ETA
                t_start, first = t_end, step
            eta = (t_end - t_start) / max(1, step - first) * (max_steps - step)
            val = None
            if step % args.eval_every == 0 or step == max_steps:
                val = validation_loss(model, ds, val_bytes, step == max_steps, args, device, autocast, d)
            rec, line = checkpoint.step_report(step, max_steps, loss, lr, dt, t_opt, clip_stats, optimizer, val, eta, args)
            if args.time_budget is not None:  # the budget spent at this step's end (evals included)
                rec["elapsed_s"] = round(t_end - t_loop, 3)
            if step % args.log_every == 0 or val:
                log(line, flush=True)
            metrics.write(rec)
            if save_when_due(args.out_dir, step, max_steps, args.save_every, stop or step == args.stop_at,
                             save, log):
                return None

    signal.signal(signal.SIGINT, signal.default_int_handler)
    final = {"val_loss": rec.get("val_loss"), "val_bpb": rec.get("val_bpb"), **baselines,
             "steps": step, "minutes": round((time.time() - t_start) / 60, 2)}
    log(f"done: val loss {final['val_loss']}, {final['val_bpb']} bpb on {len(val_bytes):,} val bytes "
        f"(gzip -9 {baselines['gzip-9']:.3f}, xz -9 {baselines['xz-9']:.3f}); weights in {args.out_dir}/")
    return final


# ----------------------------------------------------------------------------- entry, flags

def main(argv=None):
    args = parse_args(argv)
    check_args(args)  # flags, preset and overrides checked before the corpus is read
    checkpoint.check_start(args.out_dir, args.resume, args.init_from)
    with distributed(args) as (d, device):
        return train(args, d, device)


def parse_args(argv=None):
    p = parser("train.py", __doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--preset", default="nano", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--max-steps", type=int, default=450)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training: as many steps as fit (planned_steps), at most --max-steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (global)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (and per eval window)")
    p.add_argument("--short-seq-len", type=int, default=None, help="window of the first --short-seq-frac of the steps, "
                   "same tokens per step (divides --seq-len; default: a quarter of it if 4 divides it, else no short windows)")
    p.add_argument("--short-seq-frac", type=float, default=0.75, help="0 = every step at --seq-len")
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: per optimizer)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of max-steps (or of the plan)")
    p.add_argument("--decay-frac", type=float, default=0.3, help="final fraction of steps with cosine decay")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="lr at the end, as a fraction of the peak")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 = off")
    p.add_argument("--optimizer", default="muonclip", choices=["muonclip", "adamw"])
    p.add_argument("--qk-clip-tau", type=float, default=100.0, help="QK-Clip threshold (MuonClip)")
    p.add_argument("--no-qk-clip", action="store_true", help="plain Muon, no QK-Clip")
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib)")
    p.add_argument("--tokenizer", default=None, help="a cached tiktoken encoding name (default: train a BPE)")
    p.add_argument("--vocab-size", type=int, default=4096, help="size of the trained BPE")
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default: .cache beside data.py)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block (default: on for CUDA, off for CPU; see bench.py train)")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"], help="auto: nccl on CUDA")
    p.add_argument("--dist-timeout", type=float, default=600, help="seconds a collective may wait for a rank")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--copy-rows", type=int, default=0,
                   help="rows per batch replaced by a synthetic copy task (data.copy_task_row) ...")
    p.add_argument("--copy-steps", type=int, default=0, help="... during the first this many steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8, help="val batches per periodic eval")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    p.add_argument("--init-from", default=None,
                   help="start a new run from the weights in this folder (not its optimizer or step)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="save and stop after this step (as if interrupted; the schedule still spans --max-steps)")
    p.add_argument("--log-every", type=int, default=1)
    add_model_flags(p)  # every ModelArgs field: --dim 128 --n-layers 2 ...
    args = p.parse_args(argv)
    if args.short_seq_len is None:  # a quarter; no short windows where 4 does not divide --seq-len
        args.short_seq_len = args.seq_len // 4 if args.seq_len % 4 == 0 else args.seq_len
    return args


def check_args(args) -> None:  # (testbed.py checks its stages' flags with it too)
    """Every flag in range, and the preset and model overrides valid: a ValueError that names the
    flag, raised before any work (no corpus read, no tokenizer trained, no model built)."""
    check_flags(args, at_least={"max_steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "eval_every": 1,
                                "eval_batches": 1, "save_every": 1, "log_every": 1, "stop_at": 1, "warmup_steps": 0,
                                "copy_rows": 0, "copy_steps": 0, "seed": 0, "weight_decay": 0, "grad_clip": 0,
                                "decay_frac": 0, "min_lr_frac": 0, "short_seq_len": 1, "short_seq_frac": 0},
                positive=("time_budget", "lr"), fractions=("decay_frac", "min_lr_frac", "short_seq_frac"))
    if args.short_seq_frac > 0 and args.seq_len % args.short_seq_len:
        raise ValueError(f"--short-seq-len {args.short_seq_len} must divide --seq-len {args.seq_len}, so that "
                         f"short steps hold the same tokens; pass one that does, or --short-seq-frac 0")
    if args.time_budget is not None and args.resume:
        raise ValueError("--resume cannot continue a --time-budget run: its schedule followed the first "
                         "run's clock; resume with --max-steps, or start the run again")
    if not 0 < args.dist_timeout < math.inf:
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.tokenizer is None and not 257 <= args.vocab_size <= 2**20:
        raise ValueError(f"--vocab-size must be between 257 (256 bytes + EOT) and 2**20, got {args.vocab_size}")
    if not args.no_qk_clip:
        muonclip.check_tau(args.qk_clip_tau)
    if args.batch_size % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    if args.copy_rows > args.batch_size:
        raise ValueError(f"--copy-rows {args.copy_rows} exceeds --batch-size {args.batch_size}; "
                         f"at most every row of a batch can be a copy-task row")
    args_from_flags(args, args.vocab_size)
    checkpoint.check_folder(args.out_dir, "--out-dir")
    if args.cache_dir is not None:
        checkpoint.check_folder(args.cache_dir, "--cache-dir")


def cli(argv=None):
    """`python train.py`: main() with bad input as one line and exit status 2 (config.run_cli)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    cli()
