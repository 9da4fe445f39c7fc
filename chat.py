"""chat.py -- what post-training talks in and is graded on: the chat format, the tasks, the executor.

posttrain.py teaches a pretrained checkpoint to follow this file's format (SFT) and then to get its
answers right (RL). Everything the model sees and everything that scores it is here, in three parts:

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
       add       single-digit addition "7+5=", "What is 7 plus 5?" (4 wordings) -> "12"   exact match
       copy      "Repeat:\nqzkwv"                      -> "qzkwv"       exact match
       reverse   "Reverse: l u c k"                    -> "k c u l"     exact match
       defname   a `def` line from the stdlib corpus   -> its name      exact match
       fn        "Write f so that: assert f(2) == 6 .." -> "def f(x): .." run against the asserts
                 shown plus one hidden assert, in the executor (part 3); pass = every assert holds
   Held out: a task whose text hashes into 1 of 8 buckets is never trained on; evaluation draws
   only from that bucket (defname: from the corpus's val files, which pretraining held out too).
   For `add`, held out means 1 in 8 of the 400 (fact, wording) pairs: a fact met in another wording.
   SFT demonstrations of `fn` call the executor first half of the time ("run this, see it pass or
   fail, then answer"), with the executor's reply simulated from the task's own arithmetic; a test
   checks that the simulation prints what the real executor prints.

3. The executor: the model's programs never run in this process. `run_python` runs one in a fresh
   `python -I -S` child, in its own session, in a scratch directory that is deleted afterwards.
   What confines it, honestly:
     kernel-enforced   a wall-clock timeout (the whole process group is killed); rlimits on address
                       space, CPU seconds, file size, open files and core dumps, and RLIMIT_NPROC = 0
                       (which the kernel ignores for root); a seccomp filter (x86-64 and arm64) that
                       makes fork, clone, exec, socket and kill fail with EPERM, for root too; a fresh
                       network namespace where the kernel allows one (root, or unprivileged user
                       namespaces): no interface but a down loopback.
     Python-level      a PEP 578 audit hook, installed before the program starts, that refuses every
                       socket, fork/exec/spawn/subprocess, signals, ctypes, and writes, renames,
                       deletions and links outside the scratch directory.
   So processes, exec and the network are stopped by the kernel; writes outside the scratch
   directory only by the audit hook, which is a guard against accidents and against a 5M-parameter
   model, not a sandbox: its own documentation says native code bypasses it, and a program that set
   out to escape could find a way (the harness's memory is readable by the program, so a cheating
   program could even fake a pass). Reads are not restricted. A real sandbox adds filesystem
   isolation (Landlock, a mount namespace, a container or a VM). tests/test_posttrain.py shows each
   containment: an infinite loop, a fork bomb (with the audit hook, and with the kernel layers
   alone), writes outside the scratch directory, a network connection, a memory hog.
"""
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import tiktoken
import torch

import data
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
# One sum, four ways to ask: a held-out add task is a (fact, wording) pair never trained on, whose
# fact the model has (almost always) seen asked in another wording. Holding out whole facts instead
# would leave ~12 facts to evaluate on, that no amount of practice on the other 88 can teach.
ADD_WORDINGS = ("{a}+{b}=", "{a} + {b} =", "What is {a} plus {b}?", "Add {a} and {b}.")
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
    """An SFT conversation for `task`. Half of the fn demonstrations first run a candidate (right,
    or one with a plausible slip) with the executor, then answer; the tool's reply is what
    run_python would print (tool_reply), computed from the task's own arithmetic."""
    convo = [{"role": "user", "content": task.prompt}]
    if task.kind == "fn" and rng.random() < 0.5:
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
    result = (runner or run_python)(f"{reply}\n{task.tests}")
    return float(result.ok)


# ----------------------------------------------------------------------------- 3. the executor

# Runs in the child as `python -I -S -c HARNESS`: read the job from stdin, confine the process,
# run the program, then print a verdict line that starts with a secret the program never saw on
# its stdin. The program's own output comes first; a crash or a kill leaves no verdict.
HARNESS = r'''
import json, os, resource, sys, traceback


def confine(job, scratch):
    layers = ["rlimits"]
    for name, value in (("RLIMIT_AS", job["memory"]), ("RLIMIT_CPU", job["cpu"]), ("RLIMIT_FSIZE", 1 << 20),
                        ("RLIMIT_NOFILE", 64), ("RLIMIT_NPROC", 0), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    import ctypes
    if job["netns"]:  # a network namespace of our own: no interface but a down loopback
        unshare = ctypes.CDLL(None, use_errno=True).unshare
        NEWNET, NEWUSER = 0x40000000, 0x10000000  # root may unshare the network alone; others with a user ns
        if unshare(NEWNET) == 0 or unshare(NEWUSER | NEWNET) == 0:
            layers.append("netns")
    if seccomp(ctypes):
        layers.append("seccomp")
    if job["audit"]:
        realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
        inside = lambda p: isinstance(p, int) or (realpath(fsdecode(p)) + sep).startswith(scratch + sep)
        WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
        PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.symlink", "os.link", "os.chmod",
                       "os.chown", "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree",
                       "shutil.copyfile", "shutil.move"}
        DENY = ("socket.", "ctypes.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.spawn",
                "os.posix_spawn", "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "pty.")
        NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "_multiprocessing", "socket", "_socket"}

        def hook(event, args):
            if event.startswith(DENY) or (event == "import" and args[0] in NO_IMPORT):
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "open" and args[0] is not None and args[2] & WRITE and not inside(args[0]):
                raise PermissionError(f"sandbox: writing outside the scratch directory ({args[0]})")
            if event in PATH_EVENTS and not all(inside(a) for a in args if isinstance(a, (str, bytes, os.PathLike))):
                raise PermissionError(f"sandbox: {event} outside the scratch directory")
        sys.addaudithook(hook)  # (an audit hook cannot be removed)
        layers.append("audit")
    return layers


# seccomp: a filter the kernel runs on every system call of this process from now on. These fail
# with EPERM: new processes and threads (fork, vfork, clone, clone3), exec, sockets, and signals
# (kill, tkill, tgkill). Syscall numbers of x86-64 and arm64; other machines go without it.
SECCOMP_DENY = {0xC000003E: (57, 58, 56, 435, 59, 322, 41, 62, 200, 234),  # x86-64
                0xC00000B7: (220, 435, 221, 281, 198, 129, 130, 131)}     # arm64 (no fork/vfork)


def seccomp(ctypes):
    import platform
    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
    if arch is None:
        return False
    deny = SECCOMP_DENY[arch]
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1   # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    n = len(deny)
    # [0] load arch [1] other arch: jump to EPERM [2] load nr [3] x32 numbers: EPERM, then one test per
    # denied number (a match jumps to the EPERM return), then ALLOW, EPERM
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, EPERM), (LD, 0, 0, 0), (JGE, n + 1, 0, 0x40000000)]
    prog += [(JEQ, n - i, 0, nr) for i, nr in enumerate(deny)]
    prog += [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    return (libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) == 0 and
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(Prog(len(prog), insns)), 0, 0) == 0)


def main():  # locals, not globals of __main__, which the program can import
    job = json.loads(sys.stdin.read())
    nonce, code = job["nonce"], job["code"]
    sys.stderr.write("layers: " + ",".join(confine(job, os.path.realpath(job["scratch"]))) + "\n")
    sys.stderr.flush()
    del job
    error = ""
    try:
        exec(compile(code, "<program>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        error = f"SystemExit: {e.code}: the program must run to its end"
    except BaseException as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        where = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<program>"]
        if isinstance(e, AssertionError) and where:
            error = f"AssertionError at line {where[-1].lineno}: {code.splitlines()[where[-1].lineno - 1].strip()}"
    sys.stdout.write(f"\n{nonce} " + json.dumps(error) + "\n")


main()
'''


@dataclass
class RunResult:
    ok: bool           # the program ran to its end without an exception
    output: str        # what it printed (at most 4 KB)
    error: str         # the exception ("AssertionError at line 3: ..."), a timeout or a signal; "" if ok
    layers: list       # the confinement layers that were active ("rlimits", "netns", "audit")

    def reply(self) -> str:
        """What the model sees as the tool's turn: its output and its error, or "ok"."""
        text = "\n".join(s for s in (self.output.strip()[-200:], self.error) if s)
        return text or "ok"


def run_python(code: str, timeout: float = 2.0, memory_mb: int = 256, audit: bool = True,
               netns: bool = True) -> RunResult:
    """Run `code` in a confined child process (see part 3 of the docstring). `audit` and `netns`
    switch those layers off, so the tests can show what the kernel layers contain on their own."""
    scratch = tempfile.mkdtemp(prefix="nanok2-exec-")
    nonce = secrets.token_hex(16)
    job = {"nonce": nonce, "code": code, "scratch": scratch, "memory": memory_mb << 20,
           "cpu": int(timeout) + 1, "netns": netns, "audit": audit}
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
    try:
        with open(os.path.join(scratch, ".out"), "w+b") as out, open(os.path.join(scratch, ".err"), "w+b") as err:
            p = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", HARNESS], stdin=subprocess.PIPE,
                                 stdout=out, stderr=err, cwd=scratch, env=env, start_new_session=True)
            timed_out = False
            try:
                p.communicate(json.dumps(job).encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(p.pid)  # the child and anything it started, done or not
                p.wait()
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(1 << 16).decode(errors="replace"), err.read(1 << 16).decode(errors="replace")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    layers = stderr.split("\n", 1)[0][len("layers: "):].split(",") if stderr.startswith("layers: ") else []
    head, sep, verdict = stdout.rpartition(f"\n{nonce} ")
    if timed_out:
        return RunResult(False, stdout[:4096], f"timeout after {timeout:g} s", layers)
    if not sep:  # no verdict: the process died (a signal, a limit) before the program ended
        why = f"killed by {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit status {p.returncode}"
        return RunResult(False, stdout[:4096], f"{why}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}",
                         layers)
    error = json.loads(verdict)
    return RunResult(not error, head[:4096], error, layers)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
