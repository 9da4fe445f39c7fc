"""chat.py -- what post-training talks in and is graded on: the chat format, the tasks, the agent
loop that plays them, and the evaluation.

posttrain.py teaches a pretrained checkpoint to follow this file's format (SFT) and then to get its
answers right (RL). Everything the model sees and everything that scores it is here, in five parts
(the programs it writes run in executor.py):

1. The chat format (Kimi K2's role tokens). A conversation is a list of turns, each rendered as
       <|im_user|>user<|im_middle|>What is 3+4?<|im_end|><|im_assistant|>assistant<|im_middle|>7<|im_end|>
   a role token, the role's name, <|im_middle|>, the content, <|im_end|>. K2 has no token of its
   own for tool results: they are a turn of <|im_system|> named "tool". An assistant turn calls a
   tool by wrapping the program in <|tool_call_begin|> ... <|tool_call_end|> (K2's tool-call section,
   reduced to one call). SFT's loss covers the assistant's tokens only (`render` returns that mask).
   The base BPE knows none of these tokens. They are added as special tokens after its last id, and
   the checkpoint grows one embedding row and one head row per token (`grow_vocab`): exactly as many
   rows as tokens, so the head never offers an id the tokenizer cannot decode. The new rows start
   at the mean of the old ones: in-distribution inputs, and outputs no likelier than an average token.
   Kimi's own tokenizer reserves 256 ids for this; a model pretrained without them has to grow.
   Special tokens are only ever inserted by id: text that spells "<|im_end|>" stays plain text.

2. Tasks with checkable answers, generated from a seed. Each kind is small enough for a 5M-parameter
   model to move on in minutes, and each has a budget, the most reply tokens it may use:
       add       single-digit addition "7+5=", "What is 7 plus 5?" (16 wordings) -> "12"   exact match
       copy      "Repeat:\nqzkwv"                      -> "qzkwv"       exact match
       reverse   "Reverse: l u c k"                    -> "k c u l"     exact match
       defname   a `def` line from the stdlib corpus   -> its name      exact match
       fn        "Write f so that: assert f(2) == 6 .." -> "def f(x): .." run against the asserts
                 shown plus one hidden assert, in the executor (executor.py); pass = every assert holds
   Held out: a task whose text hashes into 1 of 8 buckets is never trained on; evaluation draws
   only from that bucket (defname: from the corpus's val files, which pretraining held out too).
   For `add`, held out means 1 in 8 of the 1,600 (fact, wording) pairs: a fact met in other wordings.
   SFT demonstrations of `fn` always run a first attempt in the executor before answering (right,
   or with a plausible slip), then answer with the program that passes: the call is where the
   reply can check itself, and the final answer is the one a verdict of "ok" or an assertion error
   points to. Always, not half the time: a 50/50 choice at the first reply token leaves greedy
   decoding on a tie that any update tips (measured: RESULTS.md, post-training). The executor's
   reply is simulated from the task's own arithmetic; a test checks it prints what the real one does.

3. The agent loop (`rollout`). Replies are decoded from the absorbed latent KV cache, many at once:
   rows of the same length share one batch (the cache has one position counter per batch, so a
   batch cannot mix lengths). An episode is the assistant's turn; if it called the executor, the
   tool's reply and a new assistant turn. Everything the model wrote is marked, the rest is not.

4. Evaluation: pass@1 = the share of held-out tasks (distinct; fixed seed) whose greedy reply is
   correct, per kind, with tool calls run by the executor, as in RL. Each evaluation keeps which
   tasks it got right, so two checkpoints compare task by task (`flips`).

5. The toy judge: the model grading a reply ("Correct?" -> yes/no), for posttrain.py's optional
   self-critique (posttrain.py's docstring, item 4).
"""
import hashlib
import math
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tiktoken
import torch

import data
from executor import RunResult, run_python
from generate import decode
from model import Transformer, build_model

# ----------------------------------------------------------------------------- 1. chat format

ROLE_TOKENS = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>",
               "tool": "<|im_system|>"}  # K2: a tool's reply is a system-token turn named "tool"
SPECIAL_TOKENS = ("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>",
                  "<|tool_call_begin|>", "<|tool_call_end|>")


def chat_encoding(base: tiktoken.Encoding) -> tiktoken.Encoding:
    """`base` plus the chat tokens, numbered from base.n_vocab on (unchanged if it has them)."""
    if all(t in base._special_tokens for t in SPECIAL_TOKENS):
        return base
    specials = dict(base._special_tokens)
    for t in SPECIAL_TOKENS:
        specials[t] = base.n_vocab + SPECIAL_TOKENS.index(t)
    return tiktoken.Encoding(name=f"{base.name}-chat", pat_str=base._pat_str,
                             mergeable_ranks=base._mergeable_ranks, special_tokens=specials)


def base_vocab_size(enc: tiktoken.Encoding) -> int:
    """How many ids the tokenizer had before the chat tokens were added."""
    return min(enc._special_tokens[t] for t in SPECIAL_TOKENS)


@torch.no_grad()
def grow_vocab(model: Transformer, vocab_size: int) -> Transformer:
    """A copy of `model` with `vocab_size` embedding and head rows: the old rows as they were, each
    new row the mean of the old ones. Logits of the old ids are unchanged on any input of old ids."""
    old = model.args.vocab_size
    if vocab_size < old:
        raise ValueError(f"cannot shrink a vocabulary from {old} to {vocab_size} ids")
    args = type(model.args)(**{**model.args.__dict__, "vocab_size": vocab_size})
    grown = build_model(args, model.embed.weight.device)
    state = model.state_dict()
    for name in ("embed.weight", "head.weight"):
        w = state[name]
        state[name] = torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - old, -1)])
    grown.load_state_dict(state)
    return grown


class Chat:
    """Renders conversations to token ids. A message is {"role", "content"}, and an assistant
    message may also carry "tool_call": the program it asks the executor to run."""

    def __init__(self, enc: tiktoken.Encoding):
        missing = [t for t in SPECIAL_TOKENS if t not in enc._special_tokens]
        if missing:
            raise ValueError(f"the tokenizer has no chat tokens ({', '.join(missing)}); this is a base "
                             f"checkpoint: run `python posttrain.py sft` on it first")
        self.enc = enc
        self.id = {t: enc._special_tokens[t] for t in SPECIAL_TOKENS}
        self.end, self.call_begin, self.call_end = (self.id[t] for t in ("<|im_end|>", "<|tool_call_begin|>",
                                                                           "<|tool_call_end|>"))

    def text(self, s: str) -> list[int]:
        return self.enc.encode_ordinary(s)  # never special: "<|im_end|>" in content is plain text

    def header(self, role: str) -> list[int]:
        return [self.id[ROLE_TOKENS[role]], *self.text(role), self.id["<|im_middle|>"]]

    def body(self, msg: dict) -> list[int]:
        """An assistant turn's tokens after its header, <|im_end|> included: what the model writes."""
        ids = self.text(msg.get("content", ""))
        if msg.get("tool_call") is not None:
            ids += [self.call_begin, *self.text(msg["tool_call"]), self.call_end]
        return ids + [self.end]

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, mask): the conversation after an EOT (a document starts after EOT in pretraining),
        and mask[i] = 1 where ids[i] is the assistant's own output, the tokens SFT learns."""
        ids, mask = [self.enc.eot_token], [0]
        for m in messages:
            head = self.header(m["role"])
            body = self.body(m) if m["role"] == "assistant" else self.text(m["content"]) + [self.end]
            ids += head + body
            mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
        return ids, mask

    def prompt(self, messages: list[dict]) -> list[int]:
        """The conversation so far, then an assistant header: where the model's reply starts."""
        return self.render(messages)[0] + self.header("assistant")

    def parse(self, body: list[int]) -> tuple[str, str | None, bool]:
        """A generated assistant body -> (content, tool_call or None, finished with <|im_end|>)."""
        done = self.end in body
        body = body[:body.index(self.end)] if done else body
        call = None
        if self.call_begin in body:
            i = body.index(self.call_begin)
            j = body.index(self.call_end) if self.call_end in body[i:] else len(body)
            call, body = self.decode(body[i + 1:j]), body[:i]
        return self.decode(body), call, done

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([t for t in ids if t not in self.id.values()], errors="replace")


# ----------------------------------------------------------------------------- 2. tasks

KINDS = ("add", "copy", "reverse", "defname", "fn")
BUDGET = {"add": 6, "copy": 16, "reverse": 16, "defname": 16, "fn": 96}  # reply tokens (K2's budget control)
HELD_OUT = 8  # 1 in 8 task texts is never trained on


@dataclass
class Task:
    kind: str
    prompt: str
    answer: str                 # the reference reply (what SFT shows)
    tests: str = ""             # fn: the asserts the answer must pass (the shown ones, then a hidden one)
    fn: tuple = field(default=(), repr=False)  # fn: (op, k, shown xs): lets SFT simulate tool replies

    @property
    def budget(self) -> int:
        return BUDGET[self.kind]


def held_out(text: str) -> bool:
    return hashlib.sha1(text.encode()).digest()[0] % HELD_OUT == 0


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# One sum, sixteen ways to ask: a held-out add task is a (fact, wording) pair never trained on,
# whose fact the model has seen asked in other wordings (1,600 pairs, 178 held out: enough to
# measure a paired change). Holding out whole facts instead would leave ~12 facts to evaluate on,
# that no amount of practice on the other 88 can teach.
ADD_WORDINGS = ("{a}+{b}=", "{a} + {b} =", "What is {a} plus {b}?", "Add {a} and {b}.", "{a} plus {b} is",
                "Sum {a} and {b}.", "What is {a}+{b}?", "Compute {a} + {b}.", "{a} and {b} make", "Total of {a} and {b}?",
                "{a} add {b}", "What's {a} + {b}?", "Find {a} plus {b}.", "{a}+{b} equals", "Add: {a}, {b}",
                "How much is {a} plus {b}?")
_OPS = {"+": lambda x, k: x + k, "-": lambda x, k: x - k, "*": lambda x, k: x * k}


def fn_source(op: str, k: int) -> str:
    return f"def f(x):\n    return x {op} {k}"


def _draw(kind: str, rng, corpus: dict) -> Task:
    if kind == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return Task(kind, rng.choice(ADD_WORDINGS).format(a=a, b=b), str(a + b))
    if kind in ("copy", "reverse"):
        n = rng.randint(3, 6) if kind == "copy" else rng.randint(3, 5)
        s = "".join(rng.choice(_LETTERS) for _ in range(n))
        if kind == "copy":
            return Task(kind, f"Repeat:\n{s}", s)  # after a newline: split into tokens as the reply is
        return Task(kind, f"Reverse: {' '.join(s)}", " ".join(reversed(s)))
    if kind == "defname":
        line, name = rng.choice(corpus["defs"])
        return Task(kind, f"Name the function:\n{line}", name)
    if kind == "fn":
        op, k = rng.choice(list(_OPS)), rng.randint(1, 9)
        xs = rng.sample(range(10), 2)
        shown = "\n".join(f"assert f({x}) == {_OPS[op](x, k)}" for x in xs)
        hidden = f"assert f(10) == {_OPS[op](10, k)}"
        return Task(kind, f"Write f so that:\n{shown}", fn_source(op, k), f"{shown}\n{hidden}", (op, k, xs))
    raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")


def make_task(kind: str, rng, split: str, corpus: dict) -> Task:
    """A task of `kind` from `rng` (random.Random): split "train" never returns a held-out text,
    "eval" only held-out ones (defname: train/val corpus files instead)."""
    for _ in range(10_000):
        task = _draw(kind, rng, corpus[split] if kind == "defname" else corpus)
        if kind == "defname" or held_out(task.prompt) == (split == "eval"):
            return task
    raise RuntimeError(f"no {split} task of kind {kind} found")  # (cannot happen for these kinds)


_DEF = re.compile(r"^\s*def ([A-Za-z_]\w*)\(")


def load_corpus(data_path: str | None) -> dict:
    """`def` lines of the corpus (train.py's corpus, split by file as data.py splits it), at most
    60 characters, for the defname task: {"train": {"defs": [...]}, "eval": {"defs": [...]}}."""
    root, files = data.list_files(data_path)
    train, val = data.split_files(files) if len(files) > 1 else (files, files)
    out = {}
    for split, names in (("train", train), ("eval", val)):
        defs = []
        for name in names:
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                for line in f:
                    m = _DEF.match(line)
                    if m and len(line.strip()) <= 60:
                        defs.append((line.strip(), m.group(1)))
        if not defs:
            raise ValueError(f"the corpus's {split} files hold no short `def` line; the defname task "
                             f"needs some: pass --tasks without defname, or a corpus of Python code")
        out[split] = {"defs": defs}
    return out


def demonstration(task: Task, rng) -> list[dict]:
    """An SFT conversation for `task`. fn: first run an attempt (right, or half the time one with a
    plausible slip) against the two shown asserts in the executor, then answer with the right
    program; the tool's reply is what run_python would print (simulated_reply)."""
    convo = [{"role": "user", "content": task.prompt}]
    if task.kind == "fn":
        op, k, xs = task.fn
        if rng.random() < 0.5:
            op, k = rng.choice([(o, k) for o in _OPS if o != op] + [(op, k % 9 + 1)])
        program = f"{fn_source(op, k)}\n" + "\n".join(task.tests.splitlines()[:2])
        convo += [{"role": "assistant", "content": "", "tool_call": program},
                  {"role": "tool", "content": simulated_reply(task, op, k)}]
    return convo + [{"role": "assistant", "content": task.answer}]


def simulated_reply(task: Task, op: str, k: int) -> str:
    """What the executor replies to `fn_source(op, k)` + the task's two shown asserts."""
    for i, line in enumerate(task.tests.splitlines()[:2]):
        x, want = map(int, re.match(r"assert f\((\d+)\) == (-?\d+)", line).groups())
        if _OPS[op](x, k) != want:
            return f"AssertionError at line {3 + i}: {line}"
    return "ok"


def score(task: Task, reply: str, runner=None) -> float:
    """1.0 if `reply` answers `task`, else 0.0. fn replies run in the executor (`runner`, by
    default run_python) with the task's asserts after them; the rest are exact matches."""
    if task.kind != "fn":
        return float(reply.strip() == task.answer)
    return float((runner or run_python)(program(task, reply)).ok)


def program(task: Task, reply: str) -> str:
    """What runs to check an fn reply: the reply, then the task's asserts."""
    return f"{reply}\n{task.tests}"


# ----------------------------------------------------------------------------- 3. the agent loop


@torch.no_grad()
def generate(model, rows: list[list[int]], max_new: list[int], temperature: float, gen, stop: int) -> list[list[int]]:
    """Continue each row until it writes `stop` or max_new[i] tokens (or the context is full):
    generate.py's decode loop, one batch per prompt length."""
    was_training, device, ctx = model.training, model.embed.weight.device, model.args.max_seq_len
    model.eval()  # (no router-load bookkeeping while sampling)
    out = [[] for _ in rows]
    by_len = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(r), []).append(i)
    for P, idx in sorted(by_len.items()):
        if P >= ctx:
            continue
        caches = model.make_caches(len(idx), min(ctx, P + max(max_new[i] for i in idx)), absorbed=True)
        logits = model(torch.tensor([rows[i] for i in idx], device=device), torch.arange(P, device=device), caches)[:, -1]
        bodies = decode(model, caches, logits, P, [min(max_new[i], ctx - P) for i in idx], temperature, gen, {stop})
        for i, body in zip(idx, bodies):
            out[i] = body
    model.train(was_training)
    return out


@dataclass
class Episode:
    task: Task
    ids: list[int]                  # the prompt, then everything after it
    prompt_len: int
    mask: list[int] = field(default_factory=list)  # over ids[prompt_len:]: 1 = written by the model
    reply: str = ""                 # the content of the last assistant turn
    truncated: bool = True          # the budget (or the context) ran out before the turn ended
    calls: int = 0                  # executor calls made

    @property
    def used(self) -> int:
        return sum(self.mask)


class CachedRunner:
    """run_python, remembered by program text: a small model writes the same program often. Each
    run is a child process that mostly waits (startup, the kernel's limits), so `prefetch` runs a
    batch of new programs side by side in threads: the sampler keeps one core, the children the rest."""

    def __init__(self, workers: int = 4):
        self.cache, self.runs, self.workers = {}, 0, workers

    def __call__(self, code: str) -> RunResult:
        if code not in self.cache:
            self.cache[code], self.runs = run_python(code), self.runs + 1
        return self.cache[code]

    def prefetch(self, codes) -> None:
        new = list(dict.fromkeys(c for c in codes if c not in self.cache))
        if len(new) < 2 or self.workers < 2:
            return
        with ThreadPoolExecutor(min(self.workers, len(new))) as pool:
            self.cache.update(zip(new, pool.map(run_python, new)))
        self.runs += len(new)


def prefetch_scores(eps, runner) -> None:
    """Run the programs that score() will run for these episodes' fn replies, all at once."""
    if hasattr(runner, "prefetch"):
        runner.prefetch([program(e.task, e.reply) for e in eps if e.task.kind == "fn"])


def rollout(model, c: Chat, tasks: list[Task], temperature: float, gen, runner, max_calls: int = 1) -> list[Episode]:
    """The agent loop for every task at once: generate the assistant turns; a turn that ends with
    a tool call gets the executor's reply and a new assistant turn, within the task's budget."""
    eps = [Episode(t, ids, len(ids)) for t in tasks for ids in [c.prompt([{"role": "user", "content": t.prompt}])]]
    active = list(range(len(eps)))
    while active:
        bodies = generate(model, [eps[i].ids for i in active], [eps[i].task.budget - eps[i].used for i in active],
                          temperature, gen, c.end)
        active_next, parsed = [], [c.parse(body) for body in bodies]
        # a turn that ended in a tool call gets the tool's reply if calls and budget are left
        runs = [done and call is not None and eps[i].calls < max_calls and eps[i].used + len(body) < eps[i].task.budget
                for i, body, (_, call, done) in zip(active, bodies, parsed)]
        if hasattr(runner, "prefetch"):  # this round's tool calls, side by side
            runner.prefetch([p[1] for p, run in zip(parsed, runs) if run])
        for i, body, (content, call, done), run in zip(active, bodies, parsed, runs):
            e = eps[i]
            e.ids += body
            e.mask += [1] * len(body)
            if run:
                e.calls += 1
                tool = c.header("tool") + c.text(runner(call).reply()[:120]) + [c.end] + c.header("assistant")
                e.ids += tool
                e.mask += [0] * len(tool)
                if len(e.ids) < model.args.max_seq_len:
                    active_next.append(i)
                continue
            e.reply, e.truncated = content, not done
        active = active_next
    return eps


# ----------------------------------------------------------------------------- 4. evaluation


def eval_tasks(kinds, n: int, corpus: dict, seed: int = 1234) -> list[Task]:
    """Up to n DISTINCT held-out tasks of each kind, the same for every checkpoint. A kind with
    fewer held-out prompts gives fewer (add: ~50 of its 400 (fact, wording) pairs): a prompt
    counted twice would only make the score look more certain than it is."""
    tasks = []
    for k in kinds:
        rng, seen = random.Random(f"{seed}-{k}"), {}  # a kind's tasks do not depend on the others'
        for _ in range(20 * n):
            t = make_task(k, rng, "eval", corpus)
            seen.setdefault(t.prompt, t)
            if len(seen) == n:
                break
        tasks += seen.values()
    return tasks


def pass_at_1(model, c: Chat, kinds, n: int, corpus: dict, seed: int = 1234, runner=None) -> dict:
    """pass@1 per kind on eval_tasks (greedy), their mean over kinds, and how many tasks each had."""
    tasks = eval_tasks(kinds, n, corpus, seed)
    runner = runner or CachedRunner()
    eps = rollout(model, c, tasks, 0.0, None, runner)
    prefetch_scores(eps, runner)
    right = {k: [int(score(e.task, e.reply, runner)) for e in eps if e.task.kind == k] for k in kinds}
    res = {k: sum(right[k]) / len(right[k]) for k in kinds}
    res["all"] = sum(res[k] for k in kinds) / len(kinds)
    res["tool_calls"] = sum(e.calls for e in eps) / len(eps)
    res["n"] = {k: len(v) for k, v in right.items()}
    res["correct"] = right  # task by task, for paired comparisons (flips)
    res["tasks"] = hashlib.sha1("\n".join(t.prompt for t in tasks).encode()).hexdigest()[:12]
    return res


def flips(before: dict, after: dict) -> dict | None:
    """Paired comparison of two evaluations on the same tasks: per kind, how many tasks went from
    wrong to right and from right to wrong, and the same over all kinds with the sign test's p. With
    ~200 tasks a kind's pass@1 moves by +-0.05 with the draw of tasks alone; on the same tasks only
    the flips are a change of the model."""
    if before.get("tasks") is None or before.get("tasks") != after.get("tasks"):
        return None
    out = {k: {"gained": sum(a > b for a, b in zip(after["correct"][k], v)),
               "lost": sum(a < b for a, b in zip(after["correct"][k], v))}
           for k, v in before["correct"].items()}
    g, l = sum(f["gained"] for f in out.values()), sum(f["lost"] for f in out.values())
    return {**out, "all": {"gained": g, "lost": l, "p": sign_test(g, l)}}


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if each changed task
    were a fair coin's flip (the model no better and no worse, only different)."""
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def flips_line(name: str, f: dict) -> str:
    kinds = " ".join(f"{k} +{v['gained']}/-{v['lost']}" for k, v in f.items() if k not in ("vs", "all"))
    a = f["all"]
    return f"{name}: tasks gained/lost {kinds} | all +{a['gained']}/-{a['lost']} (sign test p = {a['p']:.3g})"


def eval_line(name: str, res: dict) -> str:
    n = res.get("n", {})
    return f"{name}: pass@1 " + " ".join(f"{k} {v:.3f}" + (f" (of {n[k]})" if k in n else "")
                                         for k, v in res.items() if k not in ("n", "correct", "tasks"))


# ----------------------------------------------------------------------------- 5. the toy judge (posttrain.py's self-critique)


def judge_prompt(task: Task, reply: str) -> str:
    return f"{task.prompt}\nAnswer: {reply}\nCorrect?"


def judge_demonstration(task: Task, rng) -> list[dict]:
    """A graded reply of a verifiable task (right or wrong half the time each), for SFT: teaches the
    critic on tasks whose grade is known, the calibration K2 keeps up with its verifiable rewards."""
    right = rng.random() < 0.5
    reply = task.answer if right else _wrong_reply(task, rng)
    return [{"role": "user", "content": judge_prompt(task, reply)},
            {"role": "assistant", "content": "yes" if right else "no"}]


def _wrong_reply(task: Task, rng) -> str:
    if task.kind in ("add", "fn"):
        return task.answer[:-1] + str((int(task.answer[-1]) + rng.randint(1, 9)) % 10)
    parts = task.answer.split(" ") if task.kind == "reverse" else list(task.answer)
    rng.shuffle(parts)
    wrong = (" " if task.kind == "reverse" else "").join(parts)
    return wrong if wrong != task.answer else task.answer + task.answer[-1]


@torch.no_grad()
def critic_yes(model, c: Chat, eps: list[Episode]) -> list[float]:
    """P("yes") / (P("yes") + P("no")) of the model as judge of each episode's final reply."""
    yes, no = c.text("yes")[0], c.text("no")[0]
    rows = [c.prompt([{"role": "user", "content": judge_prompt(e.task, e.reply)}]) for e in eps]
    model.eval()
    out = []
    for row in rows:  # (one forward each: the rows differ in length; this is a toy)
        logits = model(torch.tensor([row], device=model.embed.weight.device))[0, -1]
        out.append(torch.softmax(logits[[yes, no]], -1)[0].item())
    model.train()
    return out
