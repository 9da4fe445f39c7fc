"""bench.py kv: KeepKV and its baselines (keepkv.POLICIES) on a trained checkpoint, and decode speed.
The claims it checks: KeepKV's merging (Electoral Votes + ZIP) loses less quality than eviction
(H2O, SnapKV, StreamingLLM) or convex merging at the same cache budget, and a compressed cache
decodes more tokens/s in the same memory (the paper's "more than 2x").

Quality: fixed windows of the validation split, each cut into a prompt (the model's context minus
--kv-new tokens) and a teacher-forced continuation. The prompt is prefilled and compressed to the
budget, then every continuation token is decoded one at a time through the compressed cache (one
merge or eviction per token). Against the full cache on the same windows we report the NLL
increase, top-1 agreement, and the relative change of the attention output at the steps where an
entry left (||o_after - o_before|| / ||o_before||, per head, over layers). Then the EMA alpha, the
observation window and the merge threshold are swept for keepkv at budget 0.1.

Throughput: a random-weights model with a long context (quality irrelevant), a 4096-token prompt:
decode tokens/s and cache bytes for the full cache and keepkv at 0.1 at batch 8, and for keepkv at
the larger batch its smaller cache allows in the same memory (the paper's "more than 2x"), in one run.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import keepkv
from checkpoint import load_pretrained
from model import build_model, get_args

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


def add_parser(sub):
    kv = add_kv_args(sub.add_parser("kv", help="KeepKV and baselines: quality vs budget, throughput"))
    kv.set_defaults(fn=bench_kv)
