"""Train a Kimi K2 model: `python train.py` trains the tiny preset on the Python stdlib, on CPU.

The loop, top to bottom: parse flags -> load tokens -> build the model on the meta device ->
(resume) -> for each step: lr from the WSD schedule, gradient accumulation over micro-batches,
clip, optimizer step, QK-Clip, router-bias update, one log line -> periodic eval and checkpoints.

Checkpoints (in --out-dir, each file written to a temporary name then renamed; nothing pickled):
  model.safetensors   weights (+ router biases)        config.json     model args + run flags
  tokenizer.json/bpe.tiktoken   the tokenizer           train_state.pt  optimizer tensors, RNG
  train_state.json    step + sampler position (written last: it marks a complete checkpoint)
  metrics.jsonl       one JSON object per logged step
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, fields

import torch
import torch.nn.functional as F

import data
import muonclip
from model import ModelArgs, PRESETS, Transformer, build_model, count_params, get_args, save_pretrained


# ----------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (global)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: per optimizer)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of max-steps")
    p.add_argument("--decay-frac", type=float, default=0.3, help="final fraction of steps with cosine decay")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="lr at the end, as a fraction of the peak")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 = off")
    p.add_argument("--optimizer", default="muonclip", choices=["muonclip", "adamw"])
    p.add_argument("--qk-clip-tau", type=float, default=100.0, help="QK-Clip threshold (MuonClip)")
    p.add_argument("--no-qk-clip", action="store_true", help="plain Muon, no QK-Clip")
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib)")
    p.add_argument("--tokenizer", default=None, help="a cached tiktoken encoding name (default: train a BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="size of the trained BPE")
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default: .cache beside data.py)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block (default: on for CUDA, off for CPU; see bench.py train)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8, help="val batches per periodic eval")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out-dir")
    p.add_argument("--stop-at", type=int, default=None,
                   help="save and stop after this step (as if interrupted; the schedule still spans --max-steps)")
    p.add_argument("--log-every", type=int, default=1)
    # every ModelArgs field can be overridden: --dim 128 --n-layers 2 ...
    g = p.add_argument_group("model overrides (default: the preset's value)")
    for f in fields(ModelArgs):
        if f.name != "vocab_size":  # always the tokenizer's
            g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    return p.parse_args(argv)


def model_args_from(args, vocab_size: int) -> ModelArgs:
    overrides = {f.name: getattr(args, f.name) for f in fields(ModelArgs)
                 if f.name != "vocab_size" and getattr(args, f.name) is not None}
    margs = get_args(args.preset, vocab_size=vocab_size, **overrides)
    if args.seq_len > margs.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len "
                         f"{margs.max_seq_len}; pass --max-seq-len {args.seq_len} or a shorter --seq-len")
    return margs


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def lr_multiplier(step: int, max_steps: int, warmup: int, decay_frac: float, min_frac: float) -> float:
    """Kimi K2's WSD schedule: linear warmup, a long constant stage, cosine decay to min_frac."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = max_steps - int(decay_frac * max_steps)
    if step < decay_start:
        return 1.0
    t = (step - decay_start) / max(1, max_steps - decay_start)
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))


# peak learning rates from the sweep in `python bench.py optim` (tiny preset)
DEFAULT_LR = {"adamw": 3e-3, "muonclip": 3e-3}


def build_optimizer(model, args):
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    tau = None if args.no_qk_clip else args.qk_clip_tau
    return muonclip.build_optimizer(model, args.optimizer, lr, args.weight_decay, tau)


# ----------------------------------------------------------------------------- eval

@torch.no_grad()
def evaluate(model, tokens, args, device, max_batches, autocast):
    """Mean val loss (nats/token) over fixed windows, plus the target tensors it was computed on."""
    model.eval()
    total, count, ys = 0.0, 0, []
    for x, y in data.eval_batches(tokens, args.batch_size // args.grad_accum, args.seq_len, max_batches):
        with autocast:
            logits = model(x.to(device))
        total += F.cross_entropy(logits.view(-1, logits.shape[-1]), y.to(device).view(-1),
                                 reduction="sum").item()
        count += y.numel()
        ys.append(y)
    model.train()
    return total / count, ys


# ----------------------------------------------------------------------------- checkpoints

RUN_KEYS = ("batch_size", "seq_len", "optimizer", "seed", "grad_accum")  # must match to resume


def save_checkpoint(out_dir, model, optimizer, step, sampler, args, enc):
    tmp = lambda name: os.path.join(out_dir, name + ".tmp")
    final = lambda name: os.path.join(out_dir, name)
    run = {k: getattr(args, k) for k in RUN_KEYS}
    save_pretrained(model, out_dir, extra_config={"run": run, "step": step})
    data.save_encoding(enc, out_dir)
    torch.save({"optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state()}, tmp("train_state.pt"))
    os.replace(tmp("train_state.pt"), final("train_state.pt"))
    with open(tmp("train_state.json"), "w") as f:
        json.dump({"step": step, "sampler": sampler.state_dict()}, f)
    os.replace(tmp("train_state.json"), final("train_state.json"))


def load_checkpoint(out_dir, model, optimizer, sampler, args, margs, device) -> int:
    from safetensors.torch import load_file
    state_json = os.path.join(out_dir, "train_state.json")
    if not os.path.exists(state_json):
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir!r} (train_state.json missing); "
                                f"drop --resume to start a new run")
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    with open(state_json) as f:
        state = json.load(f)
    saved = config["model_args"]
    for k, v in asdict(margs).items():
        if saved.get(k) != v:
            raise ValueError(f"--resume: checkpoint model field {k}={saved.get(k)!r} but this run has "
                             f"{k}={v!r}; use the same preset/overrides or a new --out-dir")
    for k in RUN_KEYS:
        if config["run"].get(k) != getattr(args, k):
            raise ValueError(f"--resume: checkpoint was trained with --{k.replace('_', '-')} "
                             f"{config['run'].get(k)!r}, this run has {getattr(args, k)!r}")
    if config["step"] != state["step"]:
        raise ValueError(f"--resume: checkpoint in {out_dir!r} is incomplete (weights at step "
                         f"{config['step']}, state at step {state['step']}); it was interrupted while saving")
    model.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors"), device=str(device)))
    ts = torch.load(os.path.join(out_dir, "train_state.pt"), map_location=device, weights_only=True)
    optimizer.load_state_dict(ts["optimizer"])
    torch.set_rng_state(ts["rng_cpu"])
    sampler.load_state_dict(state["sampler"])
    return state["step"]


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.batch_size % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    os.makedirs(args.out_dir, exist_ok=True)

    ds = data.load_dataset(args.data, args.tokenizer, cache_dir=args.cache_dir, vocab_size=args.vocab_size)
    print(f"data: {ds.name}")
    sampler = data.BatchSampler(ds.train, args.batch_size, args.seq_len, seed=args.seed)
    # the val bytes the final eval scores (and gzip/xz compress), computed once; this also fails
    # early, before the model is built, if val is shorter than one window
    val_ys = [y for _, y in data.eval_batches(ds.val, args.batch_size // args.grad_accum, args.seq_len, 10**9)]

    margs = model_args_from(args, ds.vocab_size)
    model = build_model(margs, device, seed=args.seed)
    total, active = count_params(model)
    print(f"model: {args.preset} preset, {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), "
          f"device {device}, compile {use_compile}")
    optimizer = build_optimizer(model, args)
    is_muon = isinstance(optimizer, muonclip.MuonClip)
    model.set_record_max_logits(is_muon)  # QK-Clip's input (and logged even with --no-qk-clip)

    step = 0
    if args.resume:
        step = load_checkpoint(args.out_dir, model, optimizer, sampler, args, margs, device)
        print(f"resumed from {args.out_dir} at step {step}")
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    _truncate_metrics(metrics_path, step)  # lines logged after the checkpoint are replayed exactly
    if use_compile:
        for layer in model.layers:  # in place: state-dict keys stay free of `_orig_mod.`
            layer.compile()

    val_bytes = data.window_bytes(ds.enc, val_ys)
    baselines = data.compression_baselines(val_bytes)
    print(f"val: {len(val_bytes):,} bytes; gzip -9 {baselines['gzip-9']:.3f} bpb, xz -9 {baselines['xz-9']:.3f} bpb")

    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 20)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    stop_requested = []
    signal.signal(signal.SIGINT, lambda *_: stop_requested.append(True))  # finish the step, then save
    tokens_per_step = args.batch_size * args.seq_len
    t_start, steps_timed = time.time(), 0
    last_good_step = step
    with open(metrics_path, "a") as metrics:
        while step < args.max_steps:
            t0 = time.time()
            mult = lr_multiplier(step, args.max_steps, warmup, args.decay_frac, args.min_lr_frac)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * mult
            lr_now = optimizer.param_groups[0]["lr"]
            x, y = sampler.get_batch(step)
            loss_sum = 0.0
            for xm, ym in zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum)):
                with autocast:
                    logits = model(xm.to(device))
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), ym.to(device).view(-1))
                (loss / args.grad_accum).backward()
                loss_sum += loss.detach()
            loss_val = (loss_sum / args.grad_accum).item()
            if not math.isfinite(loss_val):
                print(f"step {step + 1}: loss is {loss_val}; stopping. The last good checkpoint "
                      f"(step {last_good_step}) in {args.out_dir} is kept; try a lower --lr.")
                sys.exit(1)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            t_opt = time.time()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clip_stats = optimizer.qk_clip(model.pop_max_logits()) if is_muon else None
            model.update_router_bias()
            t_opt = time.time() - t_opt
            sampler.position = step + 1
            step += 1

            dt = time.time() - t0
            if step > 1 or args.resume:  # the first step includes compilation: not in the averages
                steps_timed += 1
            else:
                t_start = time.time()
            avg = (time.time() - t_start) / max(1, steps_timed)
            rec = {"step": step, "loss": loss_val, "lr": lr_now, "ms": round(dt * 1000, 1), "opt_ms": round(t_opt * 1000, 1),
                   "tok_s": round(tokens_per_step / dt)}
            if clip_stats:
                rec["max_logit"] = round(clip_stats["max_logit"], 3)
                rec["heads_clipped"] = clip_stats["heads_clipped"]
                rec["update_rms"] = optimizer.last_stats["update_rms"]
            if step % args.eval_every == 0 or step == args.max_steps:
                final = step == args.max_steps
                val_loss, ys = evaluate(model, ds.val, args, device, 10**9 if final else args.eval_batches, autocast)
                n_bytes = len(val_bytes) if final else data.eval_bytes(ds.enc, torch.cat([y.flatten() for y in ys]))
                rec["val_loss"] = round(val_loss, 5)
                rec["val_bpb"] = round(data.bits_per_byte(val_loss, sum(y.numel() for y in ys), n_bytes), 4)
            if step % args.log_every == 0 or "val_loss" in rec:
                line = (f"step {step:5d}/{args.max_steps} | loss {loss_val:.4f} | lr {lr_now:.2e} | "
                        f"{dt * 1000:6.0f} ms | {tokens_per_step / dt:7.0f} tok/s | "
                        f"ETA {_fmt_time(avg * (args.max_steps - step))}")
                if clip_stats:
                    line += (f" | max logit {clip_stats['max_logit']:.1f} ({clip_stats['heads_clipped']} clipped)"
                             f" | upd rms {rec['update_rms']:.1e}")
                if "val_loss" in rec:
                    line += f" | val {rec['val_loss']:.4f} ({rec['val_bpb']:.3f} bpb)"
                print(line, flush=True)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            last_good_step = step
            interrupted = bool(stop_requested) or step == args.stop_at
            if step % args.save_every == 0 or step == args.max_steps or interrupted:
                save_checkpoint(args.out_dir, model, optimizer, step, sampler, args, ds.enc)
            if interrupted:
                print(f"stopped at step {step}; checkpoint saved in {args.out_dir} (continue with --resume)")
                return None

    signal.signal(signal.SIGINT, signal.default_int_handler)
    final = {"val_loss": rec.get("val_loss"), "val_bpb": rec.get("val_bpb"), **baselines,
             "steps": step, "minutes": round((time.time() - t_start) / 60, 2)}
    print(f"done: val loss {final['val_loss']}, {final['val_bpb']} bpb on {len(val_bytes):,} val bytes "
          f"(gzip -9 {baselines['gzip-9']:.3f}, xz -9 {baselines['xz-9']:.3f}); weights in {args.out_dir}/")
    return final


def _truncate_metrics(path, step):
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def _fmt_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names the fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
