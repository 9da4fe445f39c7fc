"""bench.py kv: KeepKV and its baselines (keepkv.POLICIES) on a trained checkpoint, and decode speed.
The claims it checks: KeepKV's merging (Electoral Votes + ZIP) loses less quality than eviction
(H2O, SnapKV, StreamingLLM) or convex merging at the same cache budget, and a compressed cache
decodes more tokens/s in the same memory (the paper's "more than 2x").

The model: by default the long-context testbed of benchmarks/testbed.py (built once, then reused
from out/testbed/), because ranking policies needs a model that uses distant context; --kv-ckpt
takes any train.py checkpoint instead, --kv-data its corpus.

Quality: fixed windows of the validation split (files the model never trained on), each cut into a
long prompt (--kv-prompt, default the model's context minus --kv-new) and a teacher-forced
continuation. The prompt is prefilled and compressed to the budget, then every continuation token
is decoded one at a time through the compressed cache (one merge or eviction per token). Against
the full cache on the same windows we report the NLL increase, top-1 agreement, and the relative
change of the attention output at the steps where an entry left (||o_after - o_before|| /
||o_before||, per head, over layers). Then the EMA alpha, the observation window and the merge
threshold are swept for keepkv at budget 0.1.

Long-range probe, scored apart: the continuation tokens whose bigram (previous token, token) last
occurred more than --kv-probe-dist tokens earlier (and not since). Predicting them well needs an
entry from far back in the prompt, which is exactly what compression may have dropped.

Validity, printed with every table: the full cache must beat StreamingLLM at every budget (its NLL
increase > 0, and by more than 2 standard errors of the per-token paired difference). Where it does
not, the model gains nothing measurable from the entries StreamingLLM drops, the table cannot rank
policies, and the output says so in words (quality.validity in the JSON, and on the plot).

Throughput: a random-weights model with a long context (quality irrelevant), a 4096-token prompt:
decode tokens/s and cache bytes for the full cache and keepkv at 0.1 at batch 8, and for keepkv at
the larger batch its smaller cache allows in the same memory (the paper's "more than 2x"), in one run.
Outputs: out/bench/kv.json (every number) and, when matplotlib is installed, kv.png beside it.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import data
import keepkv
from benchmarks import testbed
from checkpoint import load_pretrained
from model import build_model, get_args

COMPRESSING = [p for p in keepkv.POLICIES if p != "full"]


def add_kv_args(p: argparse.ArgumentParser):
    p.add_argument("--kv-ckpt", default=None,
                   help="checkpoint folder (train.py's output; default: the testbed, built if missing)")
    p.add_argument("--kv-data", default=None, help="corpus the checkpoint was trained on (default: stdlib)")
    p.add_argument("--kv-testbed-root", default=testbed.DEFAULT_ROOT, help="where the testbed is cached")
    p.add_argument("--kv-val-frac", type=float, default=0.05)
    p.add_argument("--kv-windows", type=int, default=32, help="validation windows for the quality part")
    p.add_argument("--kv-batch", type=int, default=8)
    p.add_argument("--kv-prompt", type=int, default=None, help="prompt tokens (default: context - --kv-new)")
    p.add_argument("--kv-new", type=int, default=32, help="teacher-forced tokens after each prompt")
    p.add_argument("--kv-probe-dist", type=int, default=512,
                   help="long-range probe: the bigram last occurred more than this many tokens back")
    p.add_argument("--kv-budgets", default="0.02,0.05,0.1,0.2,0.5")
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


def _f(v, spec):  # a number, or "-" where there is none (no probe tokens)
    return "-" if v is None else format(v, spec)


@torch.no_grad()
def continuation(model, x, P, cfg):
    """Prefill x[:, :P] into a compressed cache, then decode x[:, P:] one token at a time.
    Returns the logits of the decoded steps [B, n, V] and the caches' merge statistics."""
    B, n = x.shape[0], x.shape[1] - P
    caches = keepkv.make_caches(model, B, P, cfg, max_new_tokens=n, track=True)
    model(x[:, :P], torch.arange(P, device=x.device), caches)
    out = [model(x[:, t:t + 1], torch.tensor([t], device=x.device), caches)[:, 0] for t in range(P, P + n)]
    return torch.stack(out, 1), keepkv.cache_stats(caches)


def long_range_mask(s, start, min_dist, gram=2):
    """Which targets s[:, i], i >= start, the long-range probe scores: [B, L - start] bool.
    s: [B, L] token ids (a window's inputs and its last target). Target i is probed when the
    n-gram ending at it (s[i-gram+1 .. i]) occurred before, ending at j < i, and its LAST such
    occurrence is more than min_dist tokens back (i - j > min_dist): it is not in the recent tokens."""
    assert start >= gram - 1, "every probed target needs a whole n-gram ending at it"
    g = s.unfold(1, gram, 1)                                     # [B, L-gram+1, gram], ends at k+gram-1
    ends = torch.arange(gram - 1, s.shape[1], device=s.device)  # end index of each n-gram
    probe = ends >= start
    same = (g[:, probe, None, :] == g[:, None, :, :]).all(-1)   # [B, n, all n-grams]
    earlier = ends[None, :] < ends[probe][:, None]              # [n, all]
    last = torch.where(same & earlier, ends, -1).amax(-1)        # last earlier end, -1 if none
    return (last >= 0) & (ends[probe] - last > min_dist)


def evaluate(model, batches, P, cfg, ref=None, probe_dist=512):
    """NLL of the continuation, overall and on the long-range probe's tokens; with a reference
    (the full cache's run) also the deltas."""
    nll, probe, top1, agree, stats = [], [], [], [], []
    for i, (x, y) in enumerate(batches):
        logits, st = continuation(model, x, P, cfg)
        nll.append(F.cross_entropy(logits.flatten(0, 1), y[:, P:].flatten(), reduction="none"))
        probe.append(long_range_mask(torch.cat([x, y[:, -1:]], 1), P + 1, probe_dist).flatten())
        top1.append(logits.argmax(-1).flatten())
        if ref is not None:
            agree.append((top1[-1] == ref["top1"][i]).float())
        stats.append(st)
    nll, probe = torch.cat(nll), torch.cat(probe)
    row = {"nll": nll.mean().item(), "probe_tokens": int(probe.sum()),
           "nll_probe": nll[probe].mean().item() if probe.any() else None, "top1": top1, "token_nll": nll}
    if ref is not None:
        tot = {k: sum(s[k] for s in stats) for k in ("removals", "merges", "fallbacks")}
        mean = lambda k, w: sum(s[k] * s[w] for s in stats) / max(tot[w], 1)  # noqa: E731
        diff = nll - ref["token_nll"]  # paired, token by token: the noise of dnll is diff's
        row.update(dnll=row["nll"] - ref["nll"], top1_agree=torch.cat(agree).mean().item(),
                   dnll_se=(diff.std() / math.sqrt(len(diff))).item() if len(diff) > 1 else float("inf"),
                   dnll_probe=None if row["nll_probe"] is None else row["nll_probe"] - ref["nll_probe"],
                   perturbation=mean("perturbation", "removals"),
                   perturbation_merged=mean("perturbation_merged", "merges"),
                   merge_frac=tot["merges"] / max(tot["removals"], 1),
                   prefill_merge_frac=sum(s["prefill_merge_frac"] for s in stats) / len(stats),
                   fallback_frac=tot["fallbacks"] / max(tot["merges"], 1))
    return row


def validity(rows, n_se=2.0) -> dict:
    """Can this table rank policies? Only if the full cache beats StreamingLLM at every budget:
    streaming's NLL increase is > 0, and by more than n_se standard errors of the paired per-token
    difference (else the win is noise). Otherwise the entries StreamingLLM drops are worth nothing
    to this model on these prompts, and no ranking of policies means anything."""
    stream = {r["budget"]: r for r in rows if r["policy"] == "streaming"}
    failing = [b for b, r in stream.items() if not r["dnll"] > 0]
    noise = [b for b, r in stream.items() if b not in failing and not r["dnll"] > n_se * r["dnll_se"]]
    usable = bool(stream) and not failing and not noise
    budgets = lambda bs: ", ".join(f"{b:g}" for b in bs)  # noqa: E731
    if not stream:
        msg = "NOT USABLE for claims: streaming was not measured, so nothing shows the model uses the context"
    elif failing or noise:
        msg = "NOT USABLE for claims: " + "; ".join(
            [f"StreamingLLM matches or beats the full cache at budget(s) {budgets(failing)}"] * bool(failing) +
            [f"the full cache beats StreamingLLM by less than {n_se:g} standard errors (noise) at budget(s) "
             f"{budgets(noise)}"] * bool(noise)) + "; the model does not measurably use the context that is dropped"
    else:
        msg = (f"valid: the full cache beats StreamingLLM at every budget, by more than {n_se:g} standard "
               f"errors (the model uses the context that is dropped)")
    return {"usable": usable, "failing_budgets": failing + noise, "beaten_budgets": failing,
            "within_noise_budgets": noise, "message": msg}


def _row(cfg, P, r):
    return {"policy": cfg.policy, "budget": cfg.budget, "alpha": cfg.alpha, "obs_window": cfg.obs_window,
            "threshold": cfg.threshold, "capacity": keepkv.capacity(P, cfg),
            **{k: v for k, v in r.items() if k not in ("top1", "token_nll")}}


def checkpoint_folder(args, log) -> str:
    """--kv-ckpt, or the long-context testbed (trained now if it is not cached yet)."""
    if args.kv_ckpt is not None:
        return args.kv_ckpt
    flags = testbed.train_flags(data_path=args.kv_data)
    if not testbed.is_finished(testbed.folder_for(args.kv_testbed_root, flags), flags):
        log(f"kv: no --kv-ckpt given and the long-context testbed is not built yet; building it now "
            f"(about {testbed.estimate_minutes(flags):.0f} min on an idle 2-core CPU, once). "
            f"`python bench.py testbed` builds it alone; --kv-ckpt DIR uses another checkpoint.")
    return testbed.build_testbed(flags, args.kv_testbed_root, log=log)


def quality(args, log):
    ckpt = checkpoint_folder(args, log)
    model = load_pretrained(ckpt, args.device).eval()
    enc = data.load_encoding(ckpt)
    T = model.args.max_seq_len
    P = args.kv_prompt if args.kv_prompt is not None else T - args.kv_new
    if P < 16 or P + args.kv_new > T:
        raise ValueError(f"a {P}-token prompt + {args.kv_new} new tokens must fit the model's {T}-token "
                         f"context with a prompt of at least 16; change --kv-prompt / --kv-new")
    tokens = testbed.val_tokens(enc, args.kv_data, args.kv_val_frac)
    n_batches = math.ceil(args.kv_windows / args.kv_batch)
    batches = [(x.to(args.device), y.to(args.device))
               for x, y in data.eval_batches(tokens, args.kv_batch, P + args.kv_new, n_batches)]
    n_win = sum(x.shape[0] for x, _ in batches)
    log(f"kv quality: {ckpt}: {n_win} val windows: {P}-token prompt + {args.kv_new} teacher-forced")
    if P < 768:
        log(f"  note: a {P}-token prompt is short of the long-context regime KV compression is for "
            f"(the testbed's is {testbed.CONTEXT - 32}); read the ranking with care")
    ev = lambda cfg, ref=None: evaluate(model, batches, P, cfg, ref, args.kv_probe_dist)  # noqa: E731
    ref = ev(keepkv.KVConfig(policy="full"))
    log(f"  full cache: NLL {ref['nll']:.4f}; long-range probe: {ref['probe_tokens']} tokens (bigram last "
        f"seen > {args.kv_probe_dist} back), NLL {_f(ref['nll_probe'], '.4f')}")
    out = {"checkpoint": os.path.abspath(ckpt), "context": T, "prompt_len": P,
           "new_tokens": args.kv_new, "windows": n_win, "nll_full": ref["nll"], "probe_dist": args.kv_probe_dist,
           "probe_tokens": ref["probe_tokens"], "nll_probe_full": ref["nll_probe"], "rows": [], "sweep": []}
    if "quality" not in args.kv_skip:
        policies = args.kv_policies.split(",")
        policies += [] if "streaming" in policies else ["streaming"]  # the validity check needs it
        for budget in _floats(args.kv_budgets):
            for policy in policies:
                cfg = keepkv.KVConfig(policy=policy, budget=budget)
                r = _row(cfg, P, ev(cfg, ref))
                out["rows"].append(r)
                log(f"  {policy:9s} budget {budget:<4g} (C={r['capacity']:3d}): dNLL {r['dnll']:+.4f} "
                    f"(se {r['dnll_se']:.4f})  "
                    f"probe dNLL {_f(r['dnll_probe'], '+.4f')}  top1 {r['top1_agree']:.3f}  perturb "
                    f"{r['perturbation']:.2e} (merges {r['perturbation_merged']:.2e})  merged {r['merge_frac']:.2f}")
        out["validity"] = validity(out["rows"])
        log(f"  validity: {out['validity']['message']}")
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
            r = {"setting": label, "default": default, **_row(cfg, P, ev(cfg, ref))}
            out["sweep"].append(r)
            log(f"  keepkv 0.1 {label:22s}: dNLL {r['dnll']:+.4f}  probe dNLL {_f(r['dnll_probe'], '+.4f')}  "
                f"top1 {r['top1_agree']:.3f}  "
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
        head = ["| policy | " + " | ".join(f"b = {b:g} (C = {c})" for b, c in cap.items()) + " |",
                "|---|" + "---|" * len(cap)]
        lines += [f"{q['windows']} val windows: a {q['prompt_len']}-token prompt compressed to C entries per "
                  f"head, then {q['new_tokens']} teacher-forced tokens (full-cache NLL {q['nll_full']:.3f}). "
                  "Cells: NLL increase / top-1 agreement with the full cache.", "", *head]
        policies = list(dict.fromkeys(r["policy"] for r in q["rows"]))
        for policy in policies:
            cells = {r["budget"]: f"{r['dnll']:+.3f} / {r['top1_agree']:.2f}"
                     for r in q["rows"] if r["policy"] == policy}
            lines.append(f"| {policy} | " + " | ".join(cells.get(b, "") for b in cap) + " |")
        lines += ["", f"Long-range probe: NLL increase on the {q['probe_tokens']} continuation tokens whose "
                  f"bigram last occurred more than {q['probe_dist']} tokens earlier (full-cache NLL on them "
                  f"{_f(q['nll_probe_full'], '.3f')}).", "", *head]
        for policy in policies:
            cells = {r["budget"]: _f(r["dnll_probe"], "+.3f") for r in q["rows"] if r["policy"] == policy}
            lines.append(f"| {policy} | " + " | ".join(cells.get(b, "") for b in cap) + " |")
        lines += ["", f"Validity: {q['validity']['message']}."]
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


def plot(q, path):
    """NLL increase vs budget, one line per policy (overall, and on the long-range probe). Only
    when matplotlib is installed (it is optional); returns the path written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not q.get("rows"):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, title in ((axes[0], "dnll", "all continuation tokens"),
                           (axes[1], "dnll_probe", f"long-range probe ({q['probe_tokens']} tokens)")):
        for policy in dict.fromkeys(r["policy"] for r in q["rows"]):
            pts = [(r["budget"], r[key]) for r in q["rows"] if r["policy"] == policy and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=policy)
        budgets = sorted({r["budget"] for r in q["rows"]})
        ax.set(xscale="log", xlabel="budget (fraction of the prompt kept)", ylabel="NLL increase vs full cache",
               title=title)
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets], minor=False)
        ax.minorticks_off()
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].legend()
    if not q["validity"]["usable"]:
        fig.suptitle("NOT USABLE for claims: the full cache does not beat StreamingLLM at every budget")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    png = plot(res.get("quality") or {}, os.path.splitext(args.kv_out)[0] + ".png")
    if png:
        log(f"kv: plotted {png}")
    table = markdown(res)
    if table:
        log("\n" + table)
    log(f"kv: wrote {args.kv_out} in {res['seconds']:.0f}s")
    return res


def add_parser(sub):
    kv = add_kv_args(sub.add_parser("kv", help="KeepKV and baselines: quality vs budget, throughput"))
    kv.set_defaults(fn=bench_kv)
