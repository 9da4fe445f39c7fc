"""posttrain.py: Kimi K2's post-training in miniature. SFT on conversations the project writes
itself, then reinforcement learning with rewards that a program checks.

    python posttrain.py sft                        # out/ (from train.py) -> out/sft; pass@1 before and after
    python posttrain.py rl                         # out/sft -> out/rl; pass@1 after
    python posttrain.py eval --out-dir out/rl      # pass@1 of any chat checkpoint
    python generate.py --ckpt out/rl --chat --temperature 0 --prompt "7+5="

chat.py holds what the model sees and what grades it: the chat format, the tasks, the agent loop
(sampling, with tool calls run by executor.py) and the evaluation. This file holds the learning
(the Kimi K2 report, arXiv 2507.20534, section 3; the objective of Kimi k1.5, arXiv 2501.12599):

1. SFT. Demonstrations of every task kind (chat.demonstration); cross-entropy on the assistant's
   tokens only, so the model learns to answer, not to write questions. MuonClip, as K2 does. Unlike
   K2's SFT, the PTX loss of RL (below) is mixed in here too: K2's SFT data is broad, ours is five
   narrow tasks, which alone wreck the pretraining loss (RESULTS.md has the measurement).
2. RL. Per step, --batch-size prompts and k (--group-size) replies to each, sampled from the
   current policy, which is pi_old for this step. Rewards r in {0, 1} from the checker. The loss
   (Kimi k1.5, used by K2):
       L(theta) = mean over prompts x of  1/k sum_i ( r_i - rbar(x) - tau log(pi_theta(y_i|x) / pi_old(y_i|x)) )^2
   rbar(x), the mean reward of x's k replies, is the baseline: no value network. The squared form
   pulls tau * log-ratio towards the advantage r_i - rbar: a reply above its group's mean gains
   probability, one below loses it, and by at most about |r_i - rbar| / tau nats, a trust region.
   At theta = theta_old its gradient is -2 tau/k sum_i (r_i - rbar) grad log pi(y_i|x): REINFORCE
   with a baseline. The squared term matters from the second inner step on (--inner-steps), when
   pi_theta has moved. log pi is the sum over the tokens the model wrote, at this step's temperature
   (the policy sampled from is softmax(logits / temperature)). K2's additions:
     - budget control: each task kind has a maximum number of reply tokens (chat.BUDGET); a reply
       cut at the budget before it ends its turn gets reward -penalty instead of being scored;
     - PTX: the pretraining loss on stdlib windows, mixed in with weight --ptx-coef, so the model
       keeps what pretraining taught it (the eval reports the stdlib val loss to show it);
     - temperature decay: sampling starts hot for exploration and cools linearly;
     - prioritized sampling (k1.5, --prioritize 1): task kinds drawn with weight 1 - their recent
       pass rate. Off by default: here the kinds the model already passes drift without practice
       and lose more than the practised kinds gain (RESULTS.md, "what mattered").
   Groups whose k rewards are all equal have advantage 0 and are left out; each step's lr is scaled
   by the share of replies in groups that carry a signal (--live-lr). Muon's update has the same
   size whatever the gradient's: without the scaling a batch with one informative group moves the
   model as far as one with eight, mostly along noise.
3. What PTX protects: the stdlib val loss, reported beside pass@1 (chat.pass_at_1).
4. Toy self-critique (--critic-coef, off by default): K2 scores open-ended replies with the model
   itself against rubrics, a critic kept calibrated on the verifiable tasks. Here the "rubric" is
   the one question "Correct?", the critic is the policy's own probability of answering "yes",
   and SFT shows it graded replies of the verifiable tasks. A toy: every task here has a checker.
5. Checkpoints and the command line: the weights and the optimizer state are saved with
   checkpoint.py's staged, atomic save (safetensors, train_state.json), so --resume continues a
   stopped run as train.py's does. Sampling seeds come from (seed, step): a resumed run samples
   what the uninterrupted one would have.
"""
import json
import math
import os
import random
import signal
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import chat
import checkpoint
import data
import executor
import muonclip
from chat import CachedRunner, Chat, Episode, eval_line, flips, flips_line, pass_at_1, rollout
from checkpoint import load_checkpoint, load_pretrained, save_checkpoint, save_when_due
from config import DefaultsHelpFormatter, check_flags, parser, run_cli
from parallel import Dist, pick_device
from train import lr_multiplier, optimizer_step

# ----------------------------------------------------------------------------- 1. SFT


def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(map(len, seqs))
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


def masked_lm_loss(logits, targets, mask, n_masked=None):
    """Cross-entropy summed over the positions where mask is 1, divided by n_masked (default: their
    count here; a micro-batch passes the whole batch's). logits [B, T, V], targets and mask [B, T]."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    m = mask.flatten().float()
    return (ce * m).sum() / (m.sum().clamp(min=1) if n_masked is None else n_masked)


def sft_batches(c: Chat, convos: list[list[dict]], ctx: int, n_micro: int = 1):
    """Conversations -> micro-batches (x, y, mask) for masked_lm_loss, sorted by length so that
    little is padding. Conversations longer than the context are left out."""
    rendered = sorted((r for r in map(c.render, convos) if len(r[0]) <= ctx + 1), key=lambda r: len(r[0]))
    out = []
    for part in _chunks(rendered, n_micro):
        ids, mask = pad([r[0] for r in part], c.enc.eot_token), pad([r[1] for r in part], 0)
        out.append((ids[:, :-1], ids[:, 1:], mask[:, 1:]))  # the mask follows the target
    return out


def _chunks(items, n):
    size = math.ceil(len(items) / n)
    return [items[i:i + size] for i in range(0, len(items), size)]


def draw_order(rng, kinds, n: int) -> list[str]:
    """n kinds taking turns, in an order shuffled by rng."""
    order = rng.sample(kinds, len(kinds))
    return [order[i % len(order)] for i in range(n)]


# ----------------------------------------------------------------------------- 2. RL


def advantages(rewards, group_size: int):
    """r - rbar(x): each reward minus the mean of its group (k = group_size consecutive replies)."""
    r = rewards.view(-1, group_size)
    return (r - r.mean(1, keepdim=True)).flatten()


def informative(rewards, group_size: int) -> list[int]:
    """The replies of the groups whose rewards differ: the only ones with a nonzero advantage."""
    differ = (rewards.view(-1, group_size).amax(1) > rewards.view(-1, group_size).amin(1)).tolist()
    return [i for i in range(rewards.numel()) if differ[i // group_size]]


def k15_terms(logp, logp_old, advantage, tau: float):
    """Each reply's term of Kimi k1.5's loss: (r - rbar - tau * log(pi_theta / pi_old))^2."""
    return (advantage - tau * (logp - logp_old)).pow(2)


def k15_loss(logp, logp_old, rewards, group_size: int, tau: float):
    """Kimi k1.5's policy loss over prompts of k replies each ([prompts * k] tensors): the mean of the
    terms. It is a sum over replies, so micro-batches of replies can backpropagate it piecewise."""
    return k15_terms(logp, logp_old, advantages(rewards, group_size), tau).mean()


def reply_logprob(model, eps: list[Episode], temperature: float, eot: int):
    """log pi(y|x) of each episode's model-written tokens under softmax(logits / temperature): [len(eps)]."""
    ids = pad([e.ids for e in eps], eot)
    mask = pad([[0] * e.prompt_len + e.mask for e in eps], 0)[:, 1:].to(ids.device)
    ids = ids.to(model.embed.weight.device)
    logits = model(ids[:, :-1]) / max(temperature, 1e-3)
    lp = -F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view_as(mask)
    return (lp * mask).sum(1)


def reward(e: Episode, runner, penalty: float) -> float:
    """K2's budget control first (a cut reply is penalised, not scored), then the checker."""
    return -penalty if e.truncated else chat.score(e.task, e.reply, runner)


def temperature_at(step: int, steps: int, t_start: float, t_end: float) -> float:
    return t_start + (t_end - t_start) * step / max(1, steps - 1)


# ----------------------------------------------------------------------------- 3. what PTX protects


@torch.no_grad()
def stdlib_val_loss(model, tokens, seq_len: int = 256, batches: int = 4) -> float:
    """The stdlib val loss (nats/token) on fixed windows: what PTX is there to protect."""
    model.eval()
    seq_len = min(seq_len, model.args.max_seq_len)
    device = model.embed.weight.device
    losses = [F.cross_entropy(model(x.to(device)).flatten(0, 1), y.flatten().to(device)).item()
              for x, y in data.eval_batches(tokens, 8, seq_len, batches)]
    model.train()
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- 4. loops, checkpoints, CLI


class RunState:
    """What a checkpoint records besides weights and optimizer (checkpoint.save_checkpoint calls it
    the sampler): the stage, so an SFT folder is not resumed as RL. Batches come from (seed, step)."""

    def __init__(self, stage: str, seed: int, kinds=()):
        self.stage, self.seed = stage, seed
        self.success = {k: 0.5 for k in kinds}  # RL: each kind's recent pass rate (prioritized sampling)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "seed": self.seed, "success": self.success}

    def load_state_dict(self, d: dict) -> None:
        if d.get("stage") != self.stage:
            raise ValueError(f"--resume: the checkpoint is a {d.get('stage')!r} run, not {self.stage!r}; "
                             f"resume it with `python posttrain.py {d.get('stage')} --resume`, or use a new --out-dir")
        self.success.update({k: float(v) for k, v in d.get("success", {}).items() if k in self.success})

    def pick_kinds(self, rng, n: int, prioritize: bool) -> list[str]:
        """The kinds of a step's n prompts. Prioritized sampling (Kimi k1.5, used by K2): a kind is
        drawn with weight 1 - its recent pass rate (at least 0.05), so practice goes where the
        model still fails; a kind it always passes gives groups that all score 1, which teach
        nothing. Otherwise the kinds take turns, in an order shuffled per step."""
        kinds = list(self.success)
        if not prioritize:
            return draw_order(rng, kinds, n)
        return rng.choices(kinds, weights=[max(0.05, 1 - self.success[k]) for k in kinds], k=n)

    def observe(self, kinds: list[str], scores: list[float], decay: float = 0.8) -> None:
        for k in set(kinds):
            mine = [s == 1 for kk, s in zip(kinds, scores) if kk == k]
            self.success[k] = decay * self.success[k] + (1 - decay) * sum(mine) / len(mine)


def sft_step(model, c: Chat, args, step: int, corpus: dict, ptx) -> dict:
    rng = random.Random(args.seed * 1_000_003 + step)
    tasks = [chat.make_task(k, rng, "train", corpus) for k in draw_order(rng, args.tasks, args.batch_size)]
    convos = [chat.judge_demonstration(t, rng) if rng.random() < args.judge_frac else chat.demonstration(t, rng)
              for t in tasks]
    batches = sft_batches(c, convos, model.args.max_seq_len, args.micro_batches)
    n_masked = sum(int(m.sum()) for _, _, m in batches)
    total = 0.0
    for x, y, m in batches:  # gradients accumulate; the loss is the mean over the whole batch's tokens
        loss = masked_lm_loss(model(x.to(args.device)), y.to(args.device), m.to(args.device), n_masked)
        loss.backward()
        total += loss.item()
    return {"loss": total, "tokens": n_masked, "ptx": ptx_step(model, args, ptx, step)}


def ptx_step(model, args, ptx, i: int) -> float:
    """Backpropagate ptx_coef x the pretraining loss on stdlib batch i (PTX); returns the loss."""
    if args.ptx_coef == 0:
        return 0.0
    x, y = ptx.get_batch(i)
    loss = F.cross_entropy(model(x.to(args.device)).flatten(0, 1), y.to(args.device).flatten())
    (args.ptx_coef * loss).backward()
    return loss.item()


def rl_step(model, c: Chat, args, step: int, corpus: dict, ptx, runner, optimize, state: RunState) -> dict:
    """One RL step: sample k replies to each of --batch-size prompts, score them, then --inner-steps
    updates of the k1.5 loss (+ PTX) against the log-probabilities at sampling time."""
    temperature = temperature_at(step, args.steps, args.temp_start, args.temp_end)
    rng = random.Random(args.seed * 1_000_003 + step)
    gen = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + step)
    kinds = state.pick_kinds(rng, args.batch_size, args.prioritize)
    tasks = [chat.make_task(k, rng, "train", corpus) for k in kinds]
    t0 = time.perf_counter()
    repeated = [t for t in tasks for _ in range(args.group_size)]  # each task k times: the groups in turn
    eps = rollout(model, c, repeated, temperature, gen, runner, args.max_calls)
    chat.prefetch_scores([e for e in eps if not e.truncated], runner)
    scores = [reward(e, runner, args.budget_penalty) for e in eps]
    t_sample = time.perf_counter() - t0
    state.observe([e.task.kind for e in eps], scores)
    r = torch.tensor(scores, device=args.device)
    if args.critic_coef:  # toy: the model's own grade, centred, added to the checker's reward
        grades = chat.critic_yes(model, c, eps)
        r = r + args.critic_coef * (torch.tensor(grades, device=args.device) - 0.5)
    adv = advantages(r, args.group_size)
    # A group whose replies all scored the same (all right, all wrong) has advantage 0: at pi = pi_old
    # its gradient is 0, so it carries no signal, only the pull towards pi_old. It is left out, and
    # the step size follows the share of groups that carry one: an optimizer whose update has the
    # same size whatever the gradient's (Muon, Adam) would otherwise move the model as far on a batch
    # with one informative group as on one with eight, mostly along noise.
    live = informative(r, args.group_size)
    stats = {"reward": sum(scores) / len(scores), "pass": sum(s == 1 for s in scores) / len(scores),
             "cut": sum(e.truncated for e in eps) / len(eps), "len": sum(e.used for e in eps) / len(eps),
             "T": temperature, "live": len(live) / len(eps), "replies/s": len(eps) / t_sample}
    if not live:  # every group flat: nothing to learn from this batch
        return {**stats, "loss": 0.0, "ptx": 0.0, "calls": sum(e.calls for e in eps) / len(eps), "moved": 0.0}
    chunks = _chunks(sorted(live, key=lambda i: len(eps[i].ids)), args.micro_batches)  # little padding
    logp_old, order = [None] * len(chunks), [i for ch in chunks for i in ch]
    for inner in range(args.inner_steps):
        loss, moved = 0.0, []
        for j, ch in enumerate(chunks):  # the loss is a sum over replies: backpropagated piece by piece
            lp = reply_logprob(model, [eps[i] for i in ch], temperature, c.enc.eot_token)
            if inner == 0:  # before the first update pi_theta is pi_old: its log-probs, for free
                logp_old[j] = lp.detach()
            part = k15_terms(lp, logp_old[j], adv[ch], args.tau).sum() / len(live)
            part.backward()
            loss += part.item()
            moved.append(lp.detach() - logp_old[j])
        ptx_loss = ptx_step(model, args, ptx, step * args.inner_steps + inner)
        optimize(stats["live"] if args.live_lr else 1.0)
    # did the first update move each reply's log-probability with its advantage? (the correlation of
    # log(pi_theta / pi_old) at the last inner step with r - rbar; 0 when every group is flat)
    a, dlogp = adv[order], torch.cat(moved)
    corr = float(torch.corrcoef(torch.stack([a, dlogp]))[0, 1]) if args.inner_steps > 1 and a.std() > 0 else 0.0
    return {**stats, "loss": loss, "ptx": ptx_loss, "calls": sum(e.calls for e in eps) / len(eps), "moved": corr}


def load_start(args):
    """The model and tokenizer to start from: --out-dir's own on --resume, else --init-from's;
    for SFT from a base checkpoint, with the chat tokens added (chat.grow_vocab)."""
    folder = args.out_dir if args.resume or args.stage == "eval" else args.init_from
    model = load_pretrained(folder, args.device)
    enc = data.load_encoding(folder)
    if args.stage == "sft" and not args.resume:
        enc = chat.chat_encoding(enc)
        if model.args.vocab_size != enc.n_vocab:
            model = chat.grow_vocab(model, enc.n_vocab)
    if model.args.vocab_size != enc.n_vocab:
        raise ValueError(f"{folder}: the model has {model.args.vocab_size} token ids but its tokenizer "
                         f"{enc.n_vocab}; restore the tokenizer files saved with the weights")
    return model, Chat(enc)  # Chat: a clear error for a base checkpoint in rl/eval


def load_ptx(args, c: Chat):
    """The pretraining tokens (PTX batches, and the val loss), from the corpus and tokenizer cache
    the checkpoint was pretrained with."""
    ds = data.load_dataset(args.data, cache_dir=args.cache_dir, vocab_size=chat.base_vocab_size(c.enc), verbose=False)
    if ds.enc._mergeable_ranks != c.enc._mergeable_ranks:
        raise ValueError("the corpus's tokenizer is not the checkpoint's; pass the --data and --cache-dir "
                         "that train.py was run with")
    return ds


def evaluate(model, c: Chat, args, corpus: dict, ds, runner=None) -> dict:
    """Held-out pass@1 per kind (chat.pass_at_1, task by task) and the stdlib val loss."""
    res = pass_at_1(model, c, args.tasks, args.eval_n, corpus, runner=runner)
    return {**res, "val_loss": round(stdlib_val_loss(model, ds.val), 4)}


def _point(step: int, res: dict) -> dict:  # an evaluation on the curves: its numbers, not its tasks
    return {"step": step, **{k: v for k, v in res.items() if k != "correct"}}


def run(args):
    t0 = time.time()
    model, c = load_start(args)
    kinds = args.tasks
    corpus = chat.load_corpus(args.data) if "defname" in kinds else {}
    ds = load_ptx(args, c)
    log = print
    if args.stage == "rl" or args.eval_n:  # these run model-written code: say what contains it here
        log(executor.describe())
    if args.stage == "eval":
        res = evaluate(model, c, args, corpus, ds)
        log(eval_line(args.out_dir, res))
        return res
    model.set_record_max_logits(True)  # QK-Clip, as in pretraining
    optimizer = muonclip.build_optimizer(model, args.optimizer, args.lr, args.weight_decay, 100.0)
    run_keys = SimpleNamespace(batch_size=args.batch_size, seq_len=model.args.max_seq_len, optimizer=args.optimizer,
                               seed=args.seed, grad_accum=1, copy_rows=0, copy_steps=0, short_seq_len=None,
                               short_seq_frac=0.0, grad_clip=1.0)
    state, d, step = RunState(args.stage, args.seed, kinds), Dist(), 0
    runner = CachedRunner()  # (one per process: the count in posttrain.json covers this process's runs)
    report_path = os.path.join(args.out_dir, "posttrain.json")
    report = {"stage": args.stage, "args": {k: v for k, v in vars(args).items() if k != "device"}}
    if args.resume:
        step = load_checkpoint(args.out_dir, model, optimizer, state, run_keys, model.args, d)
        if os.path.exists(report_path):
            with open(report_path) as f:
                report = json.load(f)
            for key in ("curve", "evals"):  # (the report may have been written after the checkpoint)
                report[key] = [r for r in report.get(key, []) if r["step"] <= step]
        log(f"resumed {args.out_dir} at step {step}")
    elif args.eval_n and args.stage == "sft":
        report["before"] = evaluate(model, c, args, corpus, ds, runner)
        log(eval_line("before SFT", report["before"]))
    os.makedirs(args.out_dir, exist_ok=True)
    data.atomic_write(report_path, json.dumps(report, indent=1).encode())
    ptx = data.BatchSampler(ds.train, args.ptx_batch, min(256, model.args.max_seq_len), seed=args.seed)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    n_updates = args.steps * (args.inner_steps if args.stage == "rl" else 1)
    updates = [step * (args.inner_steps if args.stage == "rl" else 1)]

    def optimize(scale: float = 1.0):  # one optimizer step on the accumulated gradient, WSD schedule
        mult = scale * lr_multiplier(updates[0], n_updates, max(1, n_updates // 20), 0.3, 0.1)
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = base * mult
        optimizer_step(model, optimizer, run_keys, d)
        updates[0] += 1

    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))  # finish the step, then save
    t_loop, first, sampled = time.time(), step, [0, 0.0]  # (replies, seconds) sampled by this process
    while step < args.steps:
        ts = time.time()
        if args.stage == "sft":
            rec = sft_step(model, c, args, step, corpus, ptx)
            optimize()
        else:
            rec = rl_step(model, c, args, step, corpus, ptx, runner, optimize, state)
            sampled[0] += args.batch_size * args.group_size
            sampled[1] += args.batch_size * args.group_size / rec["replies/s"]
        if not math.isfinite(rec["loss"]):
            raise ValueError(f"step {step + 1}: the loss is {rec['loss']}; try a lower --lr")
        step += 1
        report.setdefault("curve", []).append({"step": step, **{k: round(v, 4) for k, v in rec.items()}})
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:  # (the last: below)
            res = evaluate(model, c, args, corpus, ds, runner)
            report.setdefault("evals", []).append(_point(step, res))
            log(eval_line(f"{args.stage} step {step}", res))
        if step % args.log_every == 0 or step == args.steps:
            eta = (time.time() - t_loop) / (step - first) * (args.steps - step)
            log(f"{args.stage} step {step:4d}/{args.steps} | " + " | ".join(
                f"{k} {v:.4f}" if k in ("loss", "ptx") else f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in rec.items()) + f" | {time.time() - ts:.2f} s | ETA {eta:.0f} s", flush=True)
        if save_when_due(args.out_dir, step, args.steps, args.save_every, stop or step == args.stop_at,
                         lambda: (save_checkpoint(args.out_dir, model, optimizer, step, state, run_keys, c.enc, d),
                                  data.atomic_write(report_path, json.dumps(report, indent=1).encode())),
                         log):
            return report
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.eval_n:
        report["after"] = evaluate(model, c, args, corpus, ds, runner)
        log(eval_line(f"after {args.stage.upper()}", report["after"]))
        start = _start_eval(args, report)
        if start is not None and not any(e["step"] == 0 for e in report.get("evals", [])):
            report.setdefault("evals", []).insert(0, _point(0, start[1]))
        if start is not None and (f := flips(start[1], report["after"])) is not None:
            report["flips"] = {"vs": start[0], **f}
            log(flips_line(f"after {args.stage.upper()} vs {start[0]}", f))
        report.setdefault("evals", []).append(_point(step, report["after"]))
    report.update(steps=step, minutes=round((time.time() - t0) / 60, 2), executor_runs=runner.runs)
    if sampled[0]:
        report.update(replies=sampled[0], replies_per_s=round(sampled[0] / sampled[1], 2))
        log(f"sampled {sampled[0]} replies at {sampled[0] / sampled[1]:.1f} replies/s")
    if plot_curves(report, os.path.join(args.out_dir, "posttrain.png")):
        log(f"curves: {args.out_dir}/posttrain.png")
    data.atomic_write(report_path, json.dumps(report, indent=1).encode())
    log(f"done in {report['minutes']:.1f} min: weights in {args.out_dir}/ ({report_path})")
    return report


def _start_eval(args, report):
    """(name, evaluation) of the checkpoint this run started from: SFT's own "before", or the
    final evaluation in --init-from's posttrain.json (RL from SFT)."""
    if "before" in report:
        return "before", report["before"]
    path = os.path.join(args.init_from or "", "posttrain.json")
    if os.path.exists(path):
        with open(path) as f:
            prev = json.load(f)
        if "after" in prev:
            return args.init_from, prev["after"]
    return None


def plot_curves(report: dict, path: str) -> bool:
    """The run's reward (RL) or loss (SFT) per step and pass@1 per kind at each evaluation, as a
    PNG beside posttrain.json (which holds the numbers). matplotlib is optional: False without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curve, evals = report.get("curve", []), report.get("evals", [])
    if not curve:
        return False
    key = "reward" if "reward" in curve[0] else "loss"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([r["step"] for r in curve], [r[key] for r in curve], lw=0.8)
    a.set(xlabel="step", ylabel=key, title=f"{report['stage']}: {key} per step")
    kinds = [k for k in (evals[0] if evals else {}) if k not in ("step", "n", "tasks", "tool_calls", "val_loss")]
    for k in kinds:
        b.plot([e["step"] for e in evals], [e[k] for e in evals], "o-", label=k, lw=2 if k == "all" else 1)
    b.set(xlabel="step", ylabel="held-out pass@1", title="pass@1 per kind (greedy)")
    if kinds:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


STAGE_DEFAULTS = {  # (on 2 CPU cores from the nano preset: SFT 4 minutes, RL 15, evaluations included)
    "sft": dict(init_from="out", out_dir="out/sft", steps=300, batch_size=32, lr=2e-3, ptx_coef=1.0),
    "rl": dict(init_from="out/sft", out_dir="out/rl", steps=300, batch_size=8, lr=5e-5, ptx_coef=0.1),
    "eval": dict(init_from=None, out_dir="out/rl", steps=0, batch_size=1, lr=0.0, ptx_coef=0.0),
}


def parse_args(argv=None):
    p = parser("posttrain.py", __doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True, metavar="{sft,rl,eval}")
    for stage, defaults in STAGE_DEFAULTS.items():
        s = sub.add_parser(stage, formatter_class=DefaultsHelpFormatter,
                           help={"sft": "supervised fine-tuning of a base checkpoint",
                                 "rl": "RL with verifiable rewards on an SFT checkpoint",
                                 "eval": "pass@1 of a chat checkpoint (--out-dir)"}[stage])
        s.error = p.error
        s.add_argument("--init-from", help="the checkpoint to start from")
        s.add_argument("--out-dir", help="where the run writes its checkpoint and posttrain.json")
        s.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
        s.add_argument("--steps", type=int, help="optimizer steps (RL: sampling steps)")
        s.add_argument("--batch-size", type=int, help="conversations per step (RL: prompts per step)")
        s.add_argument("--lr", type=float, help="peak learning rate")
        s.add_argument("--optimizer", choices=("muonclip", "adamw"), default="muonclip")
        s.add_argument("--weight-decay", type=float, default=0.0)
        s.add_argument("--tasks", default=",".join(chat.KINDS), help="task kinds, comma-separated")
        s.add_argument("--eval-n", type=int, default=200, help="held-out tasks per kind in each evaluation (0 = none)")
        s.add_argument("--data", default=None, help="the corpus train.py used (default: the Python stdlib)")
        s.add_argument("--cache-dir", default=None, help="train.py's tokenizer/token cache (default: .cache)")
        s.add_argument("--device", default="auto")
        s.add_argument("--seed", type=int, default=1337)
        s.add_argument("--micro-batches", type=int, default=4,
                       help="length-sorted pieces of each batch (SFT) or of each step's replies (RL)")
        s.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads; 0 = torch's default. One, because batches here are a few "
                            "thousand tokens, and on shared cores a second thread's spin-waiting costs more "
                            "than it gains")
        s.add_argument("--log-every", type=int, default=10)
        s.add_argument("--eval-every", type=int, help="evaluate pass@1 every this many steps too "
                       "(default: RL 4 times a run, SFT at the end only; 0 = at the end only)")
        s.add_argument("--save-every", type=int, default=100)
        s.add_argument("--stop-at", type=int, default=None, help="save and stop after this step (as if interrupted)")
        s.add_argument("--judge-frac", type=float, default=0.0,
                       help="SFT: share of conversations that grade a reply (the toy critic's training)")
        g = s.add_argument_group("RL")
        g.add_argument("--group-size", type=int, default=8, help="k: replies sampled per prompt")
        g.add_argument("--tau", type=float, default=1.0, help="the k1.5 loss's regulariser towards pi_old")
        g.add_argument("--inner-steps", type=int, default=2, help="optimizer steps per sampled batch")
        g.add_argument("--prioritize", type=int, default=0, choices=(0, 1),
                       help="1: draw task kinds with weight 1 - their recent pass rate (k1.5's prioritized "
                            "sampling); 0 (default): kinds take turns, so the ones already passed keep practice")
        g.add_argument("--live-lr", type=int, default=1, choices=(0, 1),
                       help="1: scale each step's lr by the share of groups whose rewards differ")
        s.add_argument("--ptx-coef", type=float, help="weight of the pretraining (PTX) loss mixed into each step")
        s.add_argument("--ptx-batch", type=int, default=4, help="stdlib windows per PTX batch")
        g.add_argument("--temp-start", type=float, default=1.0, help="sampling temperature at the first step")
        g.add_argument("--temp-end", type=float, default=0.6, help="... and at the last")
        g.add_argument("--budget-penalty", type=float, default=0.5,
                       help="reward of a reply cut at its budget: minus this")
        g.add_argument("--max-calls", type=int, default=1, help="executor calls per episode")
        g.add_argument("--critic-coef", type=float, default=0.0,
                       help="toy self-critique: weight of the model's own grade in the reward "
                            "(needs --judge-frac in SFT)")
        s.set_defaults(**defaults)
    args = p.parse_args(argv)
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 4) if args.stage == "rl" and args.eval_n else 0
    return args


def check_args(args) -> None:
    """Every flag in range, before any work: a ValueError that names the flag."""
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if isinstance(args.tasks, str) else args.tasks
    unknown = [t for t in args.tasks if t not in chat.KINDS]
    if unknown or not args.tasks:
        raise ValueError(f"--tasks: unknown kind(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(chat.KINDS)}")
    check_flags(args, at_least={"steps": 0 if args.stage == "eval" else 1, "batch_size": 1, "eval_n": 0, "seed": 0,
                                "log_every": 1, "save_every": 1, "eval_every": 0, "micro_batches": 1, "threads": 0,
                                "group_size": 2, "inner_steps": 1, "ptx_batch": 1, "max_calls": 0, "stop_at": 1,
                                "weight_decay": 0, "tau": 1e-9, "ptx_coef": 0, "temp_start": 0, "temp_end": 0,
                                "budget_penalty": 0, "critic_coef": 0, "judge_frac": 0},
                fractions=("judge_frac",), most={"seed": 2**44})  # (seed * 1_000_003 + step seeds a Generator)
    if args.stage != "eval" and not 0 < args.lr < math.inf:
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    checkpoint.check_folder(args.out_dir, "--out-dir")
    if args.resume and not checkpoint.exists(args.out_dir):
        raise FileNotFoundError(f"--resume: no checkpoint in {args.out_dir!r} ({checkpoint.MARKER} missing); "
                                f"drop --resume to start a new run")
    folder = args.out_dir if args.resume or args.stage == "eval" else args.init_from
    if not all(os.path.isfile(os.path.join(folder, f)) for f in ("model.safetensors", "config.json")):
        fix = {"sft": "run `python train.py` first", "rl": "run `python posttrain.py sft` first",
               "eval": "pass the --out-dir of a posttrain.py run"}[args.stage]
        raise FileNotFoundError(f"no checkpoint in {folder!r} (model.safetensors + config.json); {fix}, "
                                f"or pass --init-from FOLDER")
    args.device = str(pick_device(args.device))


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args)


def cli(argv=None):
    """`python posttrain.py ...`: main() with bad input as one line and exit status 2 (config.run_cli)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    cli()
