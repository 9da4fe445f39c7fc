"""bench.py kv, speed and memory: decode tokens/s and peak memory of the latent and per-head caches.
(benchmarks/kv.py runs this after its quality part; the caches under test are built here for both.)

The claim (KeepKV's "more than 2x"): a compressed cache decodes more tokens/s in the same cache
memory, because a larger batch fits. A K2 model serves from the full LATENT cache (model.LatentKVCache,
C+Dr numbers per token and layer), so that is the cache to beat, not the per-head one (H(Dn+Dr+Dv):
4x larger on the tiny preset, 35.6x on K2), which appears only for comparison, labelled per-head.

Throughput: a random-weights tiny model (quality is irrelevant: a decode step costs the same whatever
the cache holds, as its shapes are static). Caches are filled with random entries in place of a
--kv-tp-prompt prefill, then --kv-tp-steps tokens are decoded (the first 2 untimed: warm-up, compile).
  (a) one batch (--kv-tp-batch): the full latent cache and latent keepkv@0.1; per-head full
      (model.KVCache) and per-head keepkv@0.1 beside them;
  (b) one cache-memory budget (--kv-tp-mem-mib, default: the full latent cache's bytes at
      --kv-tp-batch times --kv-tp-mem-factor): the full latent cache at the largest batch whose
      cache fits, latent keepkv@0.1 at its own (larger) one, each measured at that batch, and the
      full latent cache at keepkv's batch too (over the budget, to separate the batch's gain from
      the cache's) when it fits in half this machine's free memory, else skipped, and said so.
  Batches come from each cache's bytes per sequence, measured (nbytes() of caches built for the
  prompt and the decoded tokens), and every run's cache bytes are measured again at its batch.
Peak memory including the prefill: a real prefill of --kv-mem-prompt tokens (batch 1, the same kind
of model) into the full latent cache, latent keepkv@0.1 and per-head keepkv@0.1, the caches allocated
inside the measurement. CUDA: torch.cuda.max_memory_allocated over the call, less what was allocated
before it. CPU: the torch profiler's memory events, the peak of the CPU allocator's running total of
tensors allocated during the call (the weights, allocated before, do not count). Tensor bytes either
way, not the process's RSS, so no interpreter baseline is in them.
"""
import json
import os
import tempfile
import time

import torch

import keepkv
import keepkv_latent
from model import build_model, get_args

TP_BUDGET = 0.1


# ----------------------------------------------------------------------------- the caches under test

def make_caches(model, cache, cfg, prompt_len, new, batch=1, track=False):
    """One cache per layer. cache: "latent" (keepkv_latent.py; policy "full": model.LatentKVCache)
    or "per-head" (keepkv.py; policy "full": model.KVCache, the per-head keys and values alone)."""
    if cache == "latent":
        return keepkv_latent.make_caches(model, batch, prompt_len, cfg, max_new_tokens=new, track=track)
    if cfg.policy == "full":
        return model.make_caches(batch, prompt_len + new, absorbed=False)
    return keepkv.make_caches(model, batch, prompt_len, cfg, max_new_tokens=new, track=track)


def cache_bytes(caches) -> int:
    """Measured bytes of per-layer caches: what their slots hold (keys or latents, values, votes,
    scores, positions: each cache's nbytes())."""
    return sum(c.nbytes() for c in caches)


def entries(cache) -> int:
    """The most entries a cache holds at once (its capacity; a full cache's length)."""
    return cache.capacity if hasattr(cache, "capacity") else next(cache.buffers()).shape[1]


def fill_random(caches, prompt_len, gen):
    """Stand in for a prefill: random keys/latents, values and scores, the first entries live. A
    decode step costs the same whatever the cache holds (static shapes), and this skips a long prefill."""
    def rand_(buf):
        buf.copy_(torch.randn(buf.shape, generator=gen).to(buf))
    for c in caches:
        if not hasattr(c, "slots"):       # model.LatentKVCache (c, k_rope), model.KVCache (k, v):
            for buf in c.buffers():       # the decode masks the slots past its position
                rand_(buf)
            continue
        c.reset()                         # keepkv.KeepKVCache (k, v), LatentKeepKVCache (kv)
        s = c.slots
        for name in s.entries:
            rand_(getattr(s, name))
        n = min(prompt_len, c.kept)
        s.log_votes[..., :n] = 0.0
        for buf in (s.log_score, s.log_pred):   # the selection's score; ZIP's prediction (merging only)
            if buf is not None:
                rand_(buf[..., :n])
        s.pos[..., :n] = torch.arange(n, dtype=torch.int32, device=s.pos.device)
        if hasattr(c, "offset"):          # KeepKVCache, growing policies: prompt positions dropped
            c.offset = prompt_len - n
        c.prefilled = True


def free_memory(device) -> int:
    """Bytes this machine can still give: free GPU memory, or MemAvailable on Linux."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _mib(n):
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# ----------------------------------------------------------------------------- throughput

CONFIGS = {"latent full": ("latent", "full"), f"latent keepkv@{TP_BUDGET:g}": ("latent", "keepkv"),
           "per-head full": ("per-head", "full"), f"per-head keepkv@{TP_BUDGET:g}": ("per-head", "keepkv")}
FULL, KEEP = "latent full", f"latent keepkv@{TP_BUDGET:g}"


@torch.no_grad()
def throughput(args, log):
    """(a) tokens/s at one batch, (b) in one cache-memory budget, each cache at its largest batch."""
    P, B, n = args.kv_tp_prompt, args.kv_tp_batch, args.kv_tp_steps
    if n < 3:
        raise ValueError(f"--kv-tp-steps must be at least 3 (2 untimed warm-up steps), got {n}")
    margs = get_args("tiny", vocab_size=512, max_seq_len=P + n + 8)   # random weights, long context
    model = build_model(margs, args.device, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    step = lambda m, c, tok, pos: m(tok, pos, c)[:, -1]  # noqa: E731
    if args.kv_compile:
        step = torch.compile(step, fullgraph=True)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    cfg = lambda name: keepkv.KVConfig(policy=CONFIGS[name][1], budget=TP_BUDGET)  # noqa: E731
    per_seq = {name: cache_bytes(make_caches(model, CONFIGS[name][0], cfg(name), P, n)) for name in CONFIGS}
    runs = []

    def run(name, batch, setting):
        caches = make_caches(model, CONFIGS[name][0], cfg(name), P, n, batch)
        fill_random(caches, P, gen)
        x = torch.randint(0, margs.vocab_size, (batch, n), generator=gen).to(args.device)
        for i in range(n):
            if i == 2:   # after the warm-up (and the compile)
                sync()
                t0 = time.perf_counter()
            step(model, caches, x[:, i:i + 1], torch.tensor([P + i], device=args.device))
        sync()
        r = {"name": name, "cache": CONFIGS[name][0], "policy": CONFIGS[name][1],
             "budget": None if CONFIGS[name][1] == "full" else TP_BUDGET, "batch": batch, "setting": setting,
             "tokens_per_s": batch * (n - 2) / (time.perf_counter() - t0), "capacity": entries(caches[0]),
             "bytes": cache_bytes(caches)}
        r.update(bytes_vs_full_latent=r["bytes"] / (per_seq[FULL] * batch),
                 bytes_vs_full_per_head=r["bytes"] / (per_seq["per-head full"] * batch))
        log(f"  {name:20s} batch {batch:3d}: {r['tokens_per_s']:8.1f} tok/s, cache {_mib(r['bytes'])} "
            f"= {r['bytes_vs_full_latent']:.1%} of the full latent cache at this batch ({setting})")
        runs.append(r)
        return r

    log(f"  (a) same batch {B}; bytes per sequence, measured: " +
        ", ".join(f"{k} {_mib(v)}" for k, v in per_seq.items()))
    same = {name: run(name, B, "same batch") for name in CONFIGS}
    res = {"model": "tiny preset, random weights", "prompt_len": P, "batch": B, "decode_steps": n,
           "compiled": args.kv_compile, "budget": TP_BUDGET, "bytes_per_seq": per_seq,
           "prefill": "skipped: caches filled with random entries (decode cost does not depend on them)",
           "speedup_same_batch": same[KEEP]["tokens_per_s"] / same[FULL]["tokens_per_s"], "runs": runs}

    # (b) one memory budget: each cache at the largest batch whose cache fits in it (capped)
    mem = int(args.kv_tp_mem_mib * 2**20) if args.kv_tp_mem_mib else int(per_seq[FULL] * B * args.kv_tp_mem_factor)
    fit = {name: min(mem // per_seq[name], args.kv_tp_max_batch) for name in (FULL, KEEP)}
    sm = res["same_memory"] = {"budget_bytes": mem, "full_batch": fit[FULL], "keepkv_batch": fit[KEEP],
                               "capped_at": args.kv_tp_max_batch if mem // per_seq[KEEP] > fit[KEEP] else None}
    log(f"  (b) cache-memory budget {_mib(mem)}: full latent fits batch {fit[FULL]}, {KEEP} batch {fit[KEEP]}"
        + (f" (capped by --kv-tp-max-batch {args.kv_tp_max_batch})" if sm["capped_at"] else ""))
    if fit[FULL] < 1:
        sm["skipped"] = "the budget holds not one sequence of the full latent cache"
        log(f"  (b) skipped: {sm['skipped']}")
        return res
    own = lambda name, b: same[name] if b == B else run(name, b, "its largest batch in the budget")  # noqa: E731
    full, keep = own(FULL, fit[FULL]), own(KEEP, fit[KEEP])
    sm.update(full_tokens_per_s=full["tokens_per_s"], keepkv_tokens_per_s=keep["tokens_per_s"],
              speedup=keep["tokens_per_s"] / full["tokens_per_s"],
              within_budget=full["bytes"] <= mem and keep["bytes"] <= mem)
    need, avail = per_seq[FULL] * fit[KEEP], free_memory(args.device)
    if fit[KEEP] == fit[FULL]:
        sm["full_at_keepkv_batch"] = full
    elif need <= avail // 2:
        sm["full_at_keepkv_batch"] = run(FULL, fit[KEEP], "keepkv's batch: over the budget, for comparison")
    else:
        sm["full_at_keepkv_batch"] = {"skipped": f"its cache ({_mib(need)}) exceeds half the free memory "
                                                 f"({_mib(avail)})"}
        log(f"  full latent at batch {fit[KEEP]}: skipped, {sm['full_at_keepkv_batch']['skipped']}")
    log(f"  in {_mib(mem)} of cache: {KEEP} {keep['tokens_per_s']:.1f} tok/s at batch {fit[KEEP]} vs the full "
        f"latent cache {full['tokens_per_s']:.1f} tok/s at batch {fit[FULL]}: {sm['speedup']:.2f}x; at batch "
        f"{B}: {res['speedup_same_batch']:.2f}x")
    return res


# ----------------------------------------------------------------------------- peak memory

def measure_peak(fn, device):
    """Run fn(); return (peak tensor bytes allocated during it, above what was allocated before, fn's
    result, how it was measured)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    with tempfile.TemporaryDirectory() as d:   # the memory events carry the allocator's running total
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    events = [e for e in events if e.get("Device Type") == 0]
    if not events:
        return 0, out, "torch profiler (no allocation seen)"
    first = min(events, key=lambda e: e["Ev Idx"])
    base = first["Total Allocated"] - first["Bytes"]  # the total just before the call's first allocation
    return max(e["Total Allocated"] for e in events) - base, out, "torch profiler memory events (CPU allocator)"


@torch.no_grad()
def prefill_memory(args, log):
    """Peak tensor memory of a real prefill into each cache (the cache itself included)."""
    P = args.kv_mem_prompt
    margs = get_args("tiny", vocab_size=512, max_seq_len=P + 8)
    model = build_model(margs, args.device, seed=0).eval()
    x = torch.randint(0, margs.vocab_size, (1, P), generator=torch.Generator().manual_seed(0)).to(args.device)
    pos = torch.arange(P, device=args.device)
    full = {c: cache_bytes(make_caches(model, c, keepkv.KVConfig(policy="full"), P, 0)) for c in ("latent", "per-head")}
    res = {"model": "tiny preset, random weights", "prompt_len": P, "batch": 1, "rows": []}
    for name in (FULL, KEEP, f"per-head keepkv@{TP_BUDGET:g}"):
        cache, policy = CONFIGS[name]
        cfg = keepkv.KVConfig(policy=policy, budget=TP_BUDGET)

        def prefill():   # the caches are allocated inside the measurement
            caches = make_caches(model, cache, cfg, P, 0)
            model(x, pos, caches)
            return caches
        peak, caches, how = measure_peak(prefill, args.device)
        r = {"name": name, "cache": cache, "policy": policy, "budget": None if policy == "full" else TP_BUDGET,
             "capacity": entries(caches[0]), "peak_bytes": peak, "bytes": cache_bytes(caches), "method": how}
        r.update(bytes_vs_full_latent=r["bytes"] / full["latent"], bytes_vs_full_per_head=r["bytes"] / full["per-head"])
        res["rows"].append(r)
        res["method"] = how
        log(f"  {name:20s} prefill of {P} tokens: peak {_mib(peak)} (cache after it {_mib(r['bytes'])}, "
            f"{r['bytes_vs_full_latent']:.1%} of the full latent cache)")
    return res


# ----------------------------------------------------------------------------- tables

def markdown(tp, mem, device) -> list[str]:
    lines = []
    if tp:
        lines += ["", f"Decode after a {tp['prompt_len']}-token prompt ({tp['model']}, "
                  f"{'compiled' if tp['compiled'] else 'eager'}, {device}; caches filled at random in place "
                  f"of the prefill). Cache bytes vs the full latent cache at the same batch, measured "
                  f"(votes, scores, positions included):", "",
                  "| cache | batch | tokens/s | cache | vs full latent | setting |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['batch']} | {r['tokens_per_s']:.0f} | {_mib(r['bytes'])} | "
                  f"{r['bytes_vs_full_latent']:.1%} | {r['setting']} |" for r in tp["runs"]]
        sm = tp["same_memory"]
        lines += ["", f"At batch {tp['batch']}, {KEEP} decodes {tp['speedup_same_batch']:.2f}x the full latent "
                  f"cache's tokens/s."]
        if "speedup" in sm:
            far = sm["full_at_keepkv_batch"]
            lines[-1] += (f" In {_mib(sm['budget_bytes'])} of cache memory the full latent cache fits batch "
                          f"{sm['full_batch']} and {KEEP} batch {sm['keepkv_batch']}"
                          + (f" (capped at {sm['capped_at']})" if sm["capped_at"] else "")
                          + f": {sm['speedup']:.2f}x the tokens/s. "
                          + (f"The full latent cache at batch {sm['keepkv_batch']}: skipped, {far['skipped']}."
                             if "skipped" in far else
                             f"The full latent cache at batch {sm['keepkv_batch']} (over the budget): "
                             f"{far['tokens_per_s']:.0f} tok/s."))
        else:
            lines[-1] += f" Same-memory comparison skipped: {sm.get('skipped')}."
    if mem:
        lines += ["", f"Peak memory of a real {mem['prompt_len']}-token prefill, batch 1 ({mem['model']}, "
                  f"{device}; {mem['method']}: tensor bytes allocated during the call, the cache included, "
                  f"the weights not; the cache's bytes vs the full latent cache of the prompt beside them):", "", "| cache | prefill peak | cache after | cache vs full latent |",
                  "|---|---|---|---|"]
        lines += [f"| {r['name']} | {_mib(r['peak_bytes'])} | {_mib(r['bytes'])} | "
                  f"{r['bytes_vs_full_latent']:.1%} |" for r in mem["rows"]]
    return lines
