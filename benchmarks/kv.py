"""bench.py kv: KeepKV and its baselines at EQUAL CACHE BYTES, against the cache a K2 model serves from.

An MLA model decodes from its latent cache (model.LatentKVCache: the latent c and the rotary key,
C+Dr numbers per token and layer). The per-head cache holds H(Dn+Dr+Dv): 4x more on the tiny
preset, 35.6x more on Kimi K2 (the README's size table). So the reference of every number here is
the FULL LATENT cache, and caches are compared at equal bytes: a budget (the fraction of the
prompt's entries kept) means different bytes in different caches.

The claims it checks, and how:
1. Quality at equal bytes (the headline table). Columns: byte targets, as fractions of the full
   latent cache of the prompt (--kv-byte-fracs). Rows: (cache, policy): keepkv.py's policies on the
   latent cache (keepkv_latent.py; --kv-policies) and on the per-head cache (--kv-perhead-policies),
   each a KVConfig written policy[:field=value...]; the latent default (LATENT_ROWS) is KeepKV, its
   selection without merging, H2O, SnapKV, StreamingLLM, convex, and one-knob KeepKV ablations.
   Each row's budget is FITTED to each target from MEASURED bytes: the largest capacity Sk whose
   caches, built for the prompt and the decoded tokens, hold at most the target (nbytes(): keys or
   latents, values, votes, scores, positions of every slot; every policy but "full" holds Sk while
   decoding). "-" where even the smallest cache (n_sink + window entries) is
   over the target. Cells: NLL increase vs the full latent cache / top-1 agreement with it. The
   by-budget table (--kv-budgets) runs every row at the same budget too, its bytes beside.
2. Data: fixed windows of the validation split (files the model never trained on), each cut into a
   long prompt (--kv-prompt, default the model's context minus --kv-new) and a teacher-forced
   continuation, decoded one token at a time through the compressed cache (one merge or eviction per
   token). The model: by default the long-context testbed of benchmarks/testbed.py (built once,
   then reused from out/testbed/), because ranking policies needs a model that uses distant
   context; --kv-ckpt takes any train.py checkpoint instead, --kv-data its corpus.
3. Long-range probe, scored apart: the continuation tokens whose bigram (previous token, token) last
   occurred more than --kv-probe-dist tokens earlier (and not since). Predicting them needs an entry
   from far back in the prompt, exactly what compression may have dropped.
4. Validity, printed with every table: the full latent cache must beat latent StreamingLLM at every
   byte target (its NLL increase > 0, by more than 2 standard errors of the per-token paired
   difference). Where it does not, the model gains nothing measurable from the entries StreamingLLM
   drops, the table cannot rank policies, and the output says so (quality.validity, and the plot).
5. The sweep: the EMA alpha, the observation window and the merge threshold of latent keepkv at
   budget 0.1, one at a time.
6. Speed and memory (benchmarks/kv_speed.py): decode tokens/s at one batch and in one cache-memory
   budget, and the peak memory of a real prefill.
The break-even budgets (keepkv_latent.break_even: below which budget a compressed cache holds fewer
bytes than the full latent cache) are printed for the model and for Kimi K2.
Outputs: out/bench/kv.json (every number) and, when matplotlib is installed, kv.png beside it.
"""
import argparse
import json
import math
import os
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import data
import keepkv
import keepkv_latent
from benchmarks import kv_smollm2, kv_speed, testbed
from benchmarks.common import check_flags, row_config
from benchmarks.kv_speed import cache_bytes, make_caches
from checkpoint import load_pretrained
from model import get_args

CACHES = ("latent", "per-head")
# the latent table's rows: KeepKV (default), its selection without merging (= h2o, bit for bit),
# the baselines, convex merging, and one-knob ablations of KeepKV on the same selection
LATENT_ROWS = ("keepkv", "keepkv:merge_at=none", "h2o", "snapkv", "streaming", "convex", "keepkv:merge_at=decode",
               "keepkv:alpha=0", "keepkv:votes=off", "keepkv:select=snapkv")
PARTS = ("quality", "sweep", "throughput", "memory")  # what --kv-skip can name


def add_kv_args(p: argparse.ArgumentParser):
    p.add_argument("--model", choices=("testbed", "smollm2"), default="testbed",
                   help="testbed: this project's MLA model, latent cache (the --kv-* flags); smollm2: "
                        "SmolLM2-135M, a pretrained GQA model that uses its context (benchmarks/kv_smollm2.py)")
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
    p.add_argument("--kv-byte-fracs", default="0.05,0.1,0.2,0.5",
                   help="equal-bytes table: cache bytes as fractions of the full latent cache of the prompt")
    p.add_argument("--kv-budgets", default="0.1", help="by-budget table: fractions of the prompt kept ('' = none)")
    p.add_argument("--kv-policies", default=",".join(LATENT_ROWS),
                   help="rows on the latent cache: policy[:field=value...] (a KVConfig), e.g. keepkv:merge_at=none")
    p.add_argument("--kv-perhead-policies", default="keepkv,streaming", help="on the per-head cache")
    p.add_argument("--kv-alphas", default="0,0.5,0.8,0.9,0.95", help="sweep (latent keepkv, budget 0.1)")
    p.add_argument("--kv-obs-windows", default="4,64", help="sweep (latent keepkv, budget 0.1)")
    p.add_argument("--kv-thresholds", default="0.5,0.9", help="sweep (latent keepkv, budget 0.1)")
    p.add_argument("--kv-tp-prompt", type=int, default=4096)
    p.add_argument("--kv-tp-batch", type=int, default=8)
    p.add_argument("--kv-tp-steps", type=int, default=32)
    p.add_argument("--kv-tp-mem-mib", type=float, default=None,
                   help="cache-memory budget of the same-memory runs (default: --kv-tp-mem-factor x the "
                        "full latent cache at --kv-tp-batch)")
    p.add_argument("--kv-tp-mem-factor", type=float, default=1.0)
    p.add_argument("--kv-tp-max-batch", type=int, default=64, help="cap on the same-memory batches")
    p.add_argument("--kv-mem-prompt", type=int, default=2048, help="prompt of the peak-memory prefill")
    p.add_argument("--kv-compile", action="store_true", help="compile the decode step (throughput part)")
    p.add_argument("--kv-skip", default="",
                   help="comma list of parts to skip: quality, sweep, throughput, memory")
    p.add_argument("--kv-out", default="out/bench/kv.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    kv_smollm2.add_args(p)
    return p


def _floats(s):
    return [float(x) for x in s.split(",") if x]


def check_kv_args(args):
    """Every flag in range, and --kv-ckpt and --kv-data there, before any work (building the
    testbed alone takes ~20 minutes): a ValueError or FileNotFoundError that names the flag."""
    skip = [s for s in args.kv_skip.split(",") if s]
    if set(skip) - set(PARTS):
        raise ValueError(f"--kv-skip {args.kv_skip!r}: unknown part(s) {sorted(set(skip) - set(PARTS))}; "
                         f"name some of {', '.join(PARTS)}")
    check_flags(args, at_least={"kv_windows": 1, "kv_batch": 1, "kv_new": 1, "kv_prompt": 16, "kv_probe_dist": 0,
                                "kv_tp_prompt": 1, "kv_tp_batch": 1, "kv_tp_steps": 3, "kv_tp_max_batch": 1,
                                "kv_mem_prompt": 1}, positive=("kv_tp_mem_mib", "kv_tp_mem_factor"))
    if not 0 < args.kv_val_frac < 1:
        raise ValueError(f"--kv-val-frac must be between 0 and 1 (exclusive), got {args.kv_val_frac}")
    for name in ("kv_byte_fracs", "kv_budgets", "kv_alphas", "kv_obs_windows", "kv_thresholds"):
        flag = "--" + name.replace("_", "-")
        try:
            values = _floats(getattr(args, name))
        except ValueError:
            raise ValueError(f"{flag} {getattr(args, name)!r} is not a comma-separated list of numbers") from None
        field = {"kv_budgets": "budget", "kv_alphas": "alpha", "kv_obs_windows": "obs_window"}.get(name)
        for v in values:
            if name in ("kv_byte_fracs", "kv_obs_windows") and not v > 0:
                raise ValueError(f"{flag}: each must be positive, got {v:g}")
            try:
                keepkv.KVConfig(**({field: int(v) if field == "obs_window" else v} if field else {}))
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
    for name in ("kv_policies", "kv_perhead_policies"):
        for policy in (p for p in getattr(args, name).split(",") if p):
            try:
                row_config(policy)
            except ValueError as e:
                raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
    if "quality" in skip and "sweep" in skip:
        return
    if args.kv_ckpt is not None and not all(os.path.isfile(os.path.join(args.kv_ckpt, f))
                                            for f in ("model.safetensors", "config.json")):
        raise FileNotFoundError(f"--kv-ckpt {args.kv_ckpt!r}: no checkpoint there (model.safetensors + "
                                f"config.json); pass a folder written by train.py, or omit it for the testbed")
    if args.kv_data is not None and not os.path.exists(args.kv_data):
        raise FileNotFoundError(f"--kv-data {args.kv_data!r} does not exist; pass the corpus the checkpoint "
                                f"was trained on, or omit it for the stdlib")
    prompt = args.kv_prompt if args.kv_prompt is not None else 16   # (default: the rest of the context)
    if args.kv_ckpt is None and prompt + args.kv_new > testbed.CONTEXT:
        raise ValueError(f"a {prompt}-token prompt (--kv-prompt, at least 16) + --kv-new {args.kv_new} tokens "
                         f"exceed the testbed's {testbed.CONTEXT}-token context; lower them")


def _f(v, spec):  # a number, or "-" where there is none (no probe tokens, an unreachable target)
    return "-" if v is None else format(v, spec)


def _kib(n):
    return f"{n / 1024:.1f} KiB"


# ----------------------------------------------------------------------------- bytes

def fit_budget(model, cache, cfg, target, P, new):
    """The largest capacity Sk >= n_sink + window whose caches (batch 1, a P-token prompt, `new`
    decoded tokens) measure at most `target` bytes, by bisection on measured bytes (they grow with
    Sk): the config with that budget, or None where the smallest such cache is already over."""
    at = lambda Sk: replace(cfg, budget=min(Sk / P, 1.0))  # noqa: E731  (capacity() gives back Sk)
    measure = lambda Sk: cache_bytes(make_caches(model, cache, at(Sk), P, new))  # noqa: E731
    lo, hi = cfg.n_sink + cfg.window, P
    if measure(lo) > target:
        return None
    if measure(hi) <= target:
        lo = hi
    while hi - lo > 1:  # measure(lo) <= target < measure(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if measure(mid) <= target else (lo, mid)
    return at(lo)


def byte_sizes(model, P):
    """Measured bytes of the two uncompressed caches of the prompt, per sequence."""
    full = keepkv.KVConfig(policy="full")
    return {c: cache_bytes(make_caches(model, c, full, P, 0)) for c in CACHES}


def break_even(model_args, dtype_bytes):
    """keepkv_latent.break_even for this model (its dtype) and for Kimi K2 (bf16)."""
    return {"model": {"dtype_bytes": dtype_bytes, **keepkv_latent.break_even(model_args, dtype_bytes)},
            "kimi-k2": {"dtype_bytes": 2, **keepkv_latent.break_even(get_args("kimi-k2"), 2)}}


def _break_even_line(be):
    m, k = be["model"], be["kimi-k2"]
    return (f"Break-even (keepkv_latent.break_even): a compressed cache holds fewer bytes than the full "
            f"latent cache only below budget {m['latent']:.3f} (latent) / {m['per-head']:.3f} (per-head) on "
            f"this model ({m['dtype_bytes']}-byte entries), {k['latent']:.3f} / {k['per-head']:.4f} on Kimi K2 "
            f"(bf16)")


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def continuation(model, x, P, cache, cfg):
    """Prefill x[:, :P] into one kind of cache, then decode x[:, P:] one token at a time. Returns the
    logits of the decoded steps [B, n, V] and the caches' merge statistics (None for a full cache)."""
    B, n = x.shape[0], x.shape[1] - P
    caches = make_caches(model, cache, cfg, P, n, B, track=True)
    model(x[:, :P], torch.arange(P, device=x.device), caches)
    out = [model(x[:, t:t + 1], torch.tensor([t], device=x.device), caches)[:, 0] for t in range(P, P + n)]
    if cfg.policy == "full":
        return torch.stack(out, 1), None
    return torch.stack(out, 1), (keepkv_latent if cache == "latent" else keepkv).cache_stats(caches)


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


def continuation_nll(model, batches, P, cache, cfg, ref=None, probe_dist=512):
    """NLL of the continuation, overall and on the long-range probe's tokens; with a reference
    (the full latent cache's run) also the deltas against it."""
    nll, probe, top1, agree, stats = [], [], [], [], []
    for i, (x, y) in enumerate(batches):
        logits, st = continuation(model, x, P, cache, cfg)
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
        mean = lambda k, w: sum(s.get(k, 0.0) * s[w] for s in stats) / max(tot[w], 1)  # noqa: E731
        diff = nll - ref["token_nll"]  # paired, token by token: the noise of dnll is diff's
        row.update(dnll=row["nll"] - ref["nll"], top1_agree=torch.cat(agree).mean().item(),
                   dnll_se=(diff.std() / math.sqrt(len(diff))).item() if len(diff) > 1 else float("inf"),
                   dnll_probe=None if row["nll_probe"] is None else row["nll_probe"] - ref["nll_probe"],
                   perturbation=mean("perturbation", "removals"),
                   perturbation_merged=mean("perturbation_merged", "merges"),
                   merge_frac=tot["merges"] / max(tot["removals"], 1),
                   prefill_merge_frac=sum(s["prefill_merge_frac"] for s in stats) / len(stats),
                   fallback_frac=tot["fallbacks"] / max(tot["merges"], 1))
        if cache == "latent" and cfg.policy in keepkv.MERGING:  # the least-squares value's residual
            row["value_residual"] = mean("value_residual", "merges")       # mean over decode merges
    return row


def validity(rows, n_se=2.0, key="budget") -> dict:
    """Can this table rank policies? Only if the full latent cache beats latent StreamingLLM at every
    column (rows grouped by `key`: "frac" for the equal-bytes table, "budget" for the by-budget one):
    streaming's NLL increase is > 0, and by more than n_se standard errors of the paired per-token
    difference (else the win is noise). Otherwise the entries StreamingLLM drops are worth nothing
    to this model on these prompts, and no ranking of policies means anything. Rows without a
    "cache" field count as latent."""
    stream = {r[key]: r for r in rows if r["policy"] == "streaming" and r.get("cache", "latent") == "latent"
              and r.get("dnll") is not None}
    failing = [b for b, r in stream.items() if not r["dnll"] > 0]
    noise = [b for b, r in stream.items() if b not in failing and not r["dnll"] > n_se * r["dnll_se"]]
    usable = bool(stream) and not failing and not noise
    word = "byte target(s)" if key == "frac" else "budget(s)"
    cols = lambda bs: ", ".join(f"{b:g}" for b in bs)  # noqa: E731
    if not stream:
        msg = ("NOT USABLE for claims: latent streaming was not measured, so nothing shows the model uses "
               "the context")
    elif failing or noise:
        msg = "NOT USABLE for claims: " + "; ".join(
            [f"latent StreamingLLM matches or beats the full latent cache at {word} {cols(failing)}"] * bool(failing) +
            [f"the full latent cache beats latent StreamingLLM by less than {n_se:g} standard errors (noise) at "
             f"{word} {cols(noise)}"] * bool(noise)) + "; the model does not measurably use the context that is dropped"
    else:
        msg = (f"valid: the full latent cache beats latent StreamingLLM at every {word[:-3]}, by more than "
               f"{n_se:g} standard errors (the model uses the context that is dropped)")
    return {"usable": usable, "column": key, "failing_budgets": failing + noise, "beaten_budgets": failing,
            "within_noise_budgets": noise, "message": msg}


def _row(model, cache, cfg, P, new, sizes, r, **extra):
    """One table row: what was run, its measured bytes per sequence (at their peak), its result."""
    nbytes = cache_bytes(make_caches(model, cache, cfg, P, new))
    return {"cache": cache, "policy": cfg.policy, "budget": cfg.budget, "capacity": keepkv.capacity(P, cfg),
            "peak_entries": keepkv.capacity(P, cfg, new), "bytes": nbytes,
            "bytes_vs_full_latent": nbytes / sizes["latent"], "bytes_vs_full_per_head": nbytes / sizes["per-head"],
            "alpha": cfg.alpha, "obs_window": cfg.obs_window, "threshold": cfg.threshold, "select": cfg.select,
            "merge_at": cfg.merge_at, "votes": cfg.votes, "recent": cfg.recent, **extra,
            **{k: v for k, v in r.items() if k not in ("top1", "token_nll")}}


def _log_row(log, label, r):
    if r.get("dnll") is None:
        log(f"  {label}: -  (even n_sink + window entries are over the target)")
        return
    extra = f"  value residual {r['value_residual']:.2e}" if "value_residual" in r else ""
    log(f"  {label}: budget {r['budget']:.3f} Sk={r['capacity']:4d}, {r['bytes_vs_full_latent']:6.1%} of the full "
        f"latent cache: dNLL {r['dnll']:+.4f} (se {r['dnll_se']:.4f})  probe dNLL {_f(r['dnll_probe'], '+.4f')}  "
        f"top1 {r['top1_agree']:.3f}  perturb {r['perturbation']:.2e} (merges {r['perturbation_merged']:.2e})  "
        f"merged {r['merge_frac']:.2f}{extra}")


# ----------------------------------------------------------------------------- the quality part

def checkpoint_folder(args, log) -> str:
    """--kv-ckpt, or the long-context testbed (trained now if it is not cached yet)."""
    if args.kv_ckpt is not None:
        return args.kv_ckpt
    flags = testbed.train_flags(data_path=args.kv_data, **testbed.default_recipe(args.device))
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
    n = args.kv_new
    if P < 16 or P + n > T:
        raise ValueError(f"a {P}-token prompt + {n} new tokens must fit the model's {T}-token "
                         f"context with a prompt of at least 16; change --kv-prompt / --kv-new")
    tokens = testbed.val_tokens(enc, args.kv_data, args.kv_val_frac)
    n_batches = math.ceil(args.kv_windows / args.kv_batch)
    batches = [(x.to(args.device), y.to(args.device))
               for x, y in data.eval_batches(tokens, args.kv_batch, P + n, n_batches)]
    n_win = sum(x.shape[0] for x, _ in batches)
    sizes = byte_sizes(model, P)
    be = break_even(model.args, model.embed.weight.dtype.itemsize)
    log(f"kv quality: {ckpt}: {n_win} val windows: {P}-token prompt + {n} teacher-forced. Reference: the "
        f"full latent cache (model.LatentKVCache), {_kib(sizes['latent'])} per sequence for the prompt; the "
        f"full per-head cache would be {_kib(sizes['per-head'])} ({sizes['per-head'] / sizes['latent']:.1f}x)")
    log(f"  {_break_even_line(be)}")
    if P < 768:
        log(f"  note: a {P}-token prompt is short of the long-context regime KV compression is for "
            f"(the testbed's is {testbed.CONTEXT - 32}); read the ranking with care")
    ev = lambda cache, cfg, ref=None: continuation_nll(model, batches, P, cache, cfg, ref, args.kv_probe_dist)  # noqa: E731
    ref = ev("latent", keepkv.KVConfig(policy="full"))
    log(f"  full latent cache: NLL {ref['nll']:.4f}; long-range probe: {ref['probe_tokens']} tokens (bigram "
        f"last seen > {args.kv_probe_dist} back), NLL {_f(ref['nll_probe'], '.4f')}")
    out = {"checkpoint": os.path.abspath(ckpt), "context": T, "prompt_len": P, "new_tokens": n, "windows": n_win,
           "reference": "full latent cache (model.LatentKVCache)", "nll_full": ref["nll"],
           "full_latent_bytes": sizes["latent"], "full_per_head_bytes": sizes["per-head"], "break_even": be,
           "probe_dist": args.kv_probe_dist, "probe_tokens": ref["probe_tokens"], "nll_probe_full": ref["nll_probe"],
           "equal_bytes": [], "rows": [], "sweep": []}
    if "quality" not in args.kv_skip:
        with_streaming = lambda s: [p for p in s.split(",") if p] + ["streaming"] * ("streaming" not in s)  # noqa: E731
        specs = [("latent", p) for p in with_streaming(args.kv_policies)] + \
                [("per-head", p) for p in with_streaming(args.kv_perhead_policies)]   # streaming: validity
        log("  equal bytes: each row's budget fitted to the target from measured bytes (at their peak); "
            "dNLL and top-1 vs the full latent cache")
        for frac in _floats(args.kv_byte_fracs):
            target = frac * sizes["latent"]
            for cache, policy in specs:
                cfg = fit_budget(model, cache, row_config(policy), target, P, n)
                where = {"frac": frac, "target_bytes": target}
                r = ({"cache": cache, "policy": policy, **where, "budget": None, "capacity": None, "bytes": None}
                     if cfg is None else _row(model, cache, cfg, P, n, sizes, ev(cache, cfg, ref), policy=policy,
                                              **where))
                out["equal_bytes"].append(r)
                _log_row(log, f"{cache:8s} {policy:22s} <= {frac:<4g} x full latent", r)
        out["validity"] = validity(out["equal_bytes"], key="frac")
        log(f"  validity: {out['validity']['message']}")
        for budget in _floats(args.kv_budgets):   # same budget, different bytes
            for cache, policy in specs:
                cfg = row_config(policy, budget=budget)
                out["rows"].append(_row(model, cache, cfg, P, n, sizes, ev(cache, cfg, ref), policy=policy))
                _log_row(log, f"{cache:8s} {policy:22s} at budget {budget:<4g}", out["rows"][-1])
        if out["rows"]:
            out["validity_by_budget"] = validity(out["rows"], key="budget")
    if "sweep" not in args.kv_skip:  # one knob at a time around the defaults, latent keepkv at budget 0.1
        base = keepkv.KVConfig()
        knobs = [{"alpha": a} for a in _floats(args.kv_alphas)] + \
                [{"obs_window": int(w)} for w in _floats(args.kv_obs_windows)] + \
                [{"threshold": t} for t in _floats(args.kv_thresholds)] + \
                [{"policy": "convex", "alpha": 0.0}] + \
                [{"reattend": not base.reattend}]  # attend before or after the step's removal
        for knob in knobs:
            cfg = keepkv.KVConfig(**{"policy": "keepkv", "budget": 0.1, **knob})
            label = ", ".join(f"{k} = {v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                              else f"{k} = {v}" if isinstance(v, bool) else v for k, v in knob.items())
            default = all(getattr(base, k) == v for k, v in knob.items())
            r = {"setting": label, "default": default,
                 **_row(model, "latent", cfg, P, n, sizes, ev("latent", cfg, ref))}
            out["sweep"].append(r)
            _log_row(log, f"latent keepkv 0.1, {label:20s}", r)
    return out


# ----------------------------------------------------------------------------- tables and plot

def _table(rows, cols, key, cell):
    """Markdown rows, one per (cache, policy) in first-seen order, one cell per column value."""
    lines = [f"| cache, policy | {' | '.join(cols.values())} |", "|---|" + "---|" * len(cols)]
    for cp in dict.fromkeys((r["cache"], r["policy"]) for r in rows):
        got = {r[key]: r for r in rows if (r["cache"], r["policy"]) == cp}
        lines.append(f"| {cp[0]} {cp[1]} | " + " | ".join(cell(got[c]) if c in got else "" for c in cols) + " |")
    return lines


def markdown(res) -> str:
    """The README tables: equal-bytes quality, long-range probe, validity, by budget, sweep, speed, memory."""
    q, lines = res.get("quality") or {}, []
    ok = lambda r: r.get("dnll") is not None  # noqa: E731
    if q.get("equal_bytes"):
        eb = q["equal_bytes"]
        cols = {r["frac"]: f"{r['frac']:g} x full latent ({_kib(r['target_bytes'])})" for r in eb}
        lines += [f"{q['windows']} val windows: a {q['prompt_len']}-token prompt, then {q['new_tokens']} "
                  f"teacher-forced tokens through the compressed cache, compared at EQUAL BYTES with the full "
                  f"latent cache (model.LatentKVCache, {_kib(q['full_latent_bytes'])} per sequence for the prompt, NLL "
                  f"{q['nll_full']:.3f}; the full per-head cache is {_kib(q['full_per_head_bytes'])}). Columns: "
                  f"cache bytes per sequence at most that fraction of the full latent cache, measured (keys or "
                  f"latents, values, votes, scores, positions, every policy holds Sk while decoding); each "
                  f"row's budget is fitted to it. Cells: NLL increase vs the full latent cache / top-1 agreement "
                  f"with it (Sk = entries kept); \"-\": even n_sink + window entries are over the target.", ""]
        lines += _table(eb, cols, "frac", lambda r: f"{r['dnll']:+.3f} / {r['top1_agree']:.2f} (Sk = {r['capacity']})"
                        if ok(r) else "-")
        lines += ["", f"Long-range probe, same columns: NLL increase vs the full latent cache on the "
                  f"{q['probe_tokens']} continuation tokens whose bigram last occurred more than {q['probe_dist']} "
                  f"tokens earlier (full latent cache's NLL on them {_f(q['nll_probe_full'], '.3f')}).", ""]
        lines += _table(eb, cols, "frac", lambda r: _f(r["dnll_probe"], "+.3f") if ok(r) else "-")
        lines += ["", f"Validity: {q['validity']['message']}."]
    if q.get("rows"):
        cols = {r["budget"]: f"b = {r['budget']:g}" for r in q["rows"]}
        lines += ["", "Same budget (fraction of the prompt's entries kept), different bytes. Cells: NLL increase vs "
                  "the full latent cache / top-1 agreement [cache bytes as a fraction of the full latent cache].", ""]
        lines += _table(q["rows"], cols, "budget", lambda r: f"{r['dnll']:+.3f} / {r['top1_agree']:.2f} "
                        f"[{r['bytes_vs_full_latent']:.2f}]")
    if q.get("sweep"):
        lines += ["", "Latent keepkv at b = 0.1, one setting changed at a time (* = the default; 'convex, alpha = 0' "
                  "is convex merging with exact predictions): NLL increase vs the full latent cache / top-1 "
                  "agreement / mean attention-output change at merge steps", "", "| setting | result |", "|---|---|"]
        lines += [f"| {r['setting']}{' *' if r['default'] else ''} | {r['dnll']:+.3f} / "
                  f"{r['top1_agree']:.2f} / {r['perturbation_merged']:.1e} |" for r in q["sweep"]]
    if res.get("break_even"):
        lines += ["", _break_even_line(res["break_even"]) + "."]
    lines += kv_speed.markdown(res.get("throughput"), res.get("memory"), res["device"])
    return "\n".join(lines).strip("\n")


def plot(q, path):
    """NLL increase vs cache bytes (a fraction of the full latent cache), one line per (cache, policy),
    overall and on the long-range probe. Only with matplotlib (optional); returns the path, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in (q.get("equal_bytes") or []) + (q.get("rows") or []) if r.get("dnll") is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, title in ((axes[0], "dnll", "all continuation tokens"),
                           (axes[1], "dnll_probe", f"long-range probe ({q['probe_tokens']} tokens)")):
        for cp in dict.fromkeys((r["cache"], r["policy"]) for r in rows):
            pts = sorted({(r["bytes_vs_full_latent"], r[key]) for r in rows
                          if (r["cache"], r["policy"]) == cp and r[key] is not None})
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="-" if cp[0] == "latent" else "--", label=" ".join(cp))
        ax.set(xscale="log", xlabel="cache bytes / full latent cache's", ylabel="NLL increase vs full latent cache",
               title=title)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(1, color="grey", lw=0.5, ls=":")   # the full latent cache's own bytes
    axes[0].legend(fontsize=7)
    if not q.get("validity", {}).get("usable", False):
        fig.suptitle("NOT USABLE for claims: the full latent cache does not beat StreamingLLM at every byte target")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def bench_kv(args, log=print):
    if args.model == "smollm2":
        return kv_smollm2.run(args, log)
    check_kv_args(args)
    t0 = time.time()
    torch.manual_seed(0)
    skip = args.kv_skip.split(",")
    res = {"device": args.device, "kv_config": keepkv.KVConfig().__dict__}
    if not ("quality" in skip and "sweep" in skip):
        res["quality"] = quality(args, log)
    if "throughput" not in skip:
        log(f"kv throughput: random-weights tiny model, prompt {args.kv_tp_prompt}, batch {args.kv_tp_batch}")
        res["throughput"] = kv_speed.throughput(args, log)
    if "memory" not in skip:
        log(f"kv memory: peak of a real {args.kv_mem_prompt}-token prefill, batch 1, random-weights tiny model")
        res["memory"] = kv_speed.prefill_memory(args, log)
    # the quality model's, or else the speed parts' (the tiny preset; build_model makes it fp32)
    res["break_even"] = (res.get("quality") or {}).get("break_even") or break_even(get_args("tiny"), 4)
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
    kv = add_kv_args(sub.add_parser("kv", help="KeepKV and baselines at equal bytes vs the full latent cache; "
                                               "decode throughput, memory"))
    kv.set_defaults(fn=bench_kv)
