"""Post-training (chat.py, posttrain.py): the chat format and the vocabulary growth, the SFT loss
mask against a hand computation, the rewards on known good and bad answers, the k1.5 objective
against a hand-computed example, and a short SFT + RL run with resume (the executor's containment:
tests/test_executor.py)."""
import json
import os
import random

import pytest
import tiktoken
import torch

import chat
import data
import executor
import posttrain
from model import build_model, get_args

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def enc():
    """A byte-level tokenizer (256 bytes + EOT) with the chat tokens added: no BPE to train."""
    base = tiktoken.Encoding(name="bytes", pat_str=data.SPLIT_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={data.EOT: 256})
    return chat.chat_encoding(base)


def tiny_model(vocab_size, seed=0):
    args = get_args("tiny", vocab_size=vocab_size, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2,
                    n_heads=2, n_routed_experts=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                    v_head_dim=8, max_seq_len=256)
    return build_model(args, seed=seed)


# ----------------------------------------------------------------------------- chat format

def test_chat_tokens_follow_the_base_vocabulary(enc):
    assert [enc._special_tokens[t] for t in chat.SPECIAL_TOKENS] == list(range(257, 264))
    assert chat.base_vocab_size(enc) == 257 and enc.n_vocab == 264
    assert chat.chat_encoding(enc) is enc  # adding twice changes nothing


def test_render_mask_and_parse(enc):
    c = chat.Chat(enc)
    convo = [{"role": "user", "content": "say <|im_end|>"},
             {"role": "assistant", "content": "", "tool_call": "print(1)"},
             {"role": "tool", "content": "1"},
             {"role": "assistant", "content": "done"}]
    ids, mask = c.render(convo)
    sp = {t: enc._special_tokens[t] for t in chat.SPECIAL_TOKENS}
    # by hand: EOT, then each turn as role token, role name, <|im_middle|>, content, <|im_end|>
    b = lambda s: list(s.encode())  # noqa: E731 (byte tokenizer: one id per byte)
    user = [sp["<|im_user|>"], *b("user"), sp["<|im_middle|>"], *b("say <|im_end|>"), sp["<|im_end|>"]]
    a1_head = [sp["<|im_assistant|>"], *b("assistant"), sp["<|im_middle|>"]]
    a1_body = [sp["<|tool_call_begin|>"], *b("print(1)"), sp["<|tool_call_end|>"], sp["<|im_end|>"]]
    tool = [sp["<|im_system|>"], *b("tool"), sp["<|im_middle|>"], *b("1"), sp["<|im_end|>"]]
    a2_body = [*b("done"), sp["<|im_end|>"]]
    assert ids == [256, *user, *a1_head, *a1_body, *tool, *a1_head, *a2_body]
    assert mask == [0] * (1 + len(user) + len(a1_head)) + [1] * len(a1_body) + [0] * (len(tool) + len(a1_head)) \
        + [1] * len(a2_body)
    # the user's literal "<|im_end|>" stayed text; parse splits a generated body back up
    assert ids.count(sp["<|im_end|>"]) == 4
    assert c.parse(a1_body) == ("", "print(1)", True)
    assert c.parse(a2_body[:-1]) == ("done", None, False)  # no <|im_end|>: not finished
    assert c.prompt(convo[:1]) == [256, *user, *a1_head]


def test_grow_vocab_keeps_old_logits(enc):
    old = tiny_model(257)
    grown = chat.grow_vocab(old, enc.n_vocab)
    x = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        lo, lg = old(x), grown(x)
    assert lg.shape[-1] == 264 and torch.equal(lg[..., :257], lo)
    for name in ("embed.weight", "head.weight"):
        w = grown.state_dict()[name]
        assert torch.allclose(w[257:], old.state_dict()[name].mean(0).expand(7, -1))
    with pytest.raises(ValueError, match="shrink"):
        chat.grow_vocab(grown, 100)


# ----------------------------------------------------------------------------- SFT loss

def test_sft_loss_is_on_assistant_tokens_only(enc):
    c = chat.Chat(enc)
    model = tiny_model(enc.n_vocab)
    rng = random.Random(0)
    corpus = {"train": {"defs": [("def spam(x):", "spam")]}}
    convos = [chat.demonstration(chat.make_task(k, rng, "train", corpus), rng) for k in chat.KINDS]
    batches = posttrain.sft_batches(c, convos, 256, n_micro=2)
    n_masked = sum(int(m.sum()) for _, _, m in batches)
    loss = sum(posttrain.masked_lm_loss(model(x), y, m, n_masked) for x, y, m in batches)
    # by hand: for every conversation, -log p(token) at each token after an assistant's <|im_middle|>
    # up to and including its <|im_end|>, averaged over all of them
    im_asst, im_mid, im_end = (enc._special_tokens[t] for t in ("<|im_assistant|>", "<|im_middle|>", "<|im_end|>"))
    nll = []
    for convo in convos:
        ids = c.render(convo)[0]
        with torch.no_grad():
            logp = model(torch.tensor([ids]))[0].log_softmax(-1)
        in_reply = False
        for t in range(1, len(ids)):
            if in_reply:
                nll.append(-logp[t - 1, ids[t]].item())
                in_reply = ids[t] != im_end
            elif ids[t] == im_mid and ids[t - len("assistant") - 1] == im_asst:
                in_reply = True
    assert len(nll) == n_masked
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)


# ----------------------------------------------------------------------------- rewards

def test_rewards_on_known_answers():
    rng = random.Random(3)
    corpus = {"train": {"defs": [("def parse_args(argv=None):", "parse_args")]}}
    t = {k: chat.make_task(k, rng, "train", corpus) for k in chat.KINDS}
    for kind in ("add", "copy", "reverse", "defname"):
        assert chat.score(t[kind], t[kind].answer) == 1.0
        assert chat.score(t[kind], f" {t[kind].answer}\n") == 1.0    # surrounding space is not the answer
        assert chat.score(t[kind], t[kind].answer + "x") == 0.0
    assert chat.score(chat.Task("add", "7+5=", "12"), "12") == 1.0
    assert chat.score(chat.Task("add", "7+5=", "12"), "13") == 0.0
    assert chat.score(chat.Task("reverse", "Reverse: a b c", "c b a"), "cba") == 0.0
    assert chat.score(t["defname"], "parse_args") == 1.0
    # fn: run in the executor against the shown asserts and a hidden one
    fn = chat.Task("fn", "Write f so that:\nassert f(2) == 6\nassert f(3) == 9", chat.fn_source("*", 3),
                   "assert f(2) == 6\nassert f(3) == 9\nassert f(10) == 30")
    assert chat.score(fn, "def f(x):\n    return x * 3") == 1.0
    assert chat.score(fn, "def f(x):\n    return 3 * x  # any right program") == 1.0
    assert chat.score(fn, "def f(x):\n    return x + 3") == 0.0
    assert chat.score(fn, "def f(x):\n    return {2: 6, 3: 9}[x]") == 0.0      # the hidden assert
    assert chat.score(fn, "import sys\nsys.exit(0)") == 0.0                    # exiting early is no pass
    assert chat.score(fn, "x * 3") == 0.0 and chat.score(fn, "") == 0.0
    # K2's budget control: a reply cut at its budget scores -penalty, whatever it says
    ep = chat.Episode(t["add"], [], 0, reply=t["add"].answer, truncated=True)
    assert posttrain.reward(ep, None, 0.5) == -0.5
    ep.truncated = False
    assert posttrain.reward(ep, None, 0.5) == 1.0


def test_simulated_tool_replies_match_the_executor():
    """SFT's fn demonstrations show the executor's reply without running it; it must be the reply
    the executor really gives (rollouts run the real one)."""
    rng = random.Random(0)
    for _ in range(3):
        task = chat.make_task("fn", rng, "train", {})
        op, k, _ = task.fn
        for cand in [(op, k), ("+" if op != "+" else "-", k), (op, k % 9 + 1)]:
            program = chat.fn_source(*cand) + "\n" + "\n".join(task.tests.splitlines()[:2])
            assert executor.run_python(program).reply() == chat.simulated_reply(task, *cand)


def test_prefetch_runs_each_new_program_once_side_by_side():
    """CachedRunner.prefetch: the same results as running one by one, each distinct program once."""
    codes = [f"assert {i} % 2 == 0" for i in range(4)] + ["assert 0 % 2 == 0"]
    runner = chat.CachedRunner(workers=3)
    runner.prefetch(codes)
    assert runner.runs == 4 and [runner(c).ok for c in codes] == [executor.run_python(c).ok for c in codes]
    assert runner.runs == 4 and [runner(c).ok for c in codes] == [True, False, True, False, True]


def test_fn_demonstrations_always_call_then_answer_right():
    """No coin flip at the first reply token: every fn demonstration calls the executor, and the
    final answer passes the task's asserts whatever the attempt's verdict was."""
    rng = random.Random(1)
    verdicts = set()
    for _ in range(40):
        task = chat.make_task("fn", rng, "train", {})
        convo = chat.demonstration(task, rng)
        assert [t["role"] for t in convo] == ["user", "assistant", "tool", "assistant"] and convo[1]["tool_call"]
        verdicts.add(convo[2]["content"] == "ok")
        assert convo[-1]["content"] == task.answer and executor.run_python(f"{task.answer}\n{task.tests}").ok
    assert verdicts == {True, False}  # both an attempt that passes and one that fails are shown


def test_held_out_tasks_are_never_trained_on():
    corpus = {"train": {"defs": [("def a():", "a")]}, "eval": {"defs": [("def b():", "b")]}}
    rng = random.Random(0)
    for kind in ("add", "copy", "reverse", "fn"):
        train = {chat.make_task(kind, rng, "train", corpus).prompt for _ in range(300)}
        held = {chat.make_task(kind, rng, "eval", corpus).prompt for _ in range(30)}
        assert not train & held and all(chat.held_out(p) for p in held)
    assert chat.make_task("defname", rng, "eval", corpus).answer == "b"


def test_eval_tasks_are_distinct_held_out_and_fixed():
    tasks = chat.eval_tasks(["add", "copy"], 200, {})
    add = [t.prompt for t in tasks if t.kind == "add"]
    # 100 facts x 16 wordings, 1 in 8 held out: fewer than 200 distinct add prompts exist
    n_held = sum(chat.held_out(w.format(a=a, b=b)) for a in range(10) for b in range(10) for w in chat.ADD_WORDINGS)
    assert len(add) == len(set(add)) == n_held and 150 < n_held < 200
    assert sum(t.kind == "copy" for t in tasks) == 200 and all(chat.held_out(t.prompt) for t in tasks)
    assert [t.prompt for t in chat.eval_tasks(["add", "copy"], 200, {})] == [t.prompt for t in tasks]


def test_flips_count_paired_changes():
    before = {"tasks": "abc", "correct": {"add": [1, 0, 1, 0], "copy": [0, 0]}}
    after = {"tasks": "abc", "correct": {"add": [0, 1, 1, 1], "copy": [0, 0]}}
    assert chat.flips(before, after) == {"add": {"gained": 2, "lost": 1}, "copy": {"gained": 0, "lost": 0},
                                         "all": {"gained": 2, "lost": 1, "p": 1.0}}
    assert chat.flips(before, {**after, "tasks": "other"}) is None   # not the same tasks: no pairing


def test_sign_test_matches_the_binomial():
    # 10 of 10 one way: 2 * 0.5^10; 20 of 60: R's binom.test(20, 60)$p.value = 0.01349
    assert chat.sign_test(10, 0) == pytest.approx(2 / 1024)
    assert chat.sign_test(20, 40) == pytest.approx(0.013489, abs=1e-6)
    assert chat.sign_test(40, 20) == chat.sign_test(20, 40)
    assert chat.sign_test(5, 5) == 1.0 and chat.sign_test(0, 0) == 1.0


def test_toy_critic_labels_agree_with_the_checker():
    """The toy critic's SFT data grades replies; its grades must be the verifier's."""
    rng = random.Random(1)
    corpus = {"train": {"defs": [("def parse_args(argv=None):", "parse_args")]}}
    seen = set()
    for i in range(60):
        task = chat.make_task(chat.KINDS[i % len(chat.KINDS)], rng, "train", corpus)
        convo = chat.judge_demonstration(task, rng)
        reply = convo[0]["content"].split("\nAnswer: ")[1].rsplit("\nCorrect?", 1)[0]
        grade = convo[1]["content"]
        assert grade == ("yes" if chat.score(task, reply) == 1.0 else "no"), (task, reply, grade)
        seen.add(grade)
    assert seen == {"yes", "no"}


# ----------------------------------------------------------------------------- RL objective

def test_k15_loss_hand_computed():
    # two prompts, K = 2: rewards (1, 0) and (1, 1); tau = 0.5
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    logp_old = torch.tensor([-1.2, -1.9, -0.5, -2.0])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss = posttrain.k15_loss(logp, logp_old, r, group_size=2, tau=0.5)
    # group 1: rbar 0.5; (0.5 - 0.5*0.2)^2 = 0.16, (-0.5 - 0.5*(-0.1))^2 = 0.2025
    # group 2: rbar 1;   (0 - 0)^2 = 0,            (0 - 0.5*(-1))^2 = 0.25
    assert loss.item() == pytest.approx((0.16 + 0.2025 + 0 + 0.25) / 4)
    # at theta = theta_old the gradient is REINFORCE with the group-mean baseline: -2 tau (r - rbar) / n,
    # over n = 4 replies: -2 * 0.5 * (+-0.5) / 4
    at_old = logp_old.clone().requires_grad_(True)
    posttrain.k15_loss(at_old, logp_old, r, 2, 0.5).backward()
    assert at_old.grad.tolist() == pytest.approx([-0.125, 0.125, 0.0, 0.0])


def test_only_groups_whose_rewards_differ_are_learned_from():
    # K = 2: rewards (1, 0) differ, (1, 1) and (0, 0) are flat, (0.5, 0.25) differ
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.25])
    assert posttrain.informative(r, 2) == [0, 1, 6, 7]
    assert posttrain.informative(torch.zeros(6), 3) == []


def test_prioritized_sampling_follows_the_pass_rates():
    state = posttrain.RunState("rl", 0, ["add", "copy", "reverse"])
    # EMA with decay 0.8 from 0.5: add passes 2 of 4 -> 0.5; copy 0 of 2 -> 0.4; reverse 2 of 2 -> 0.6
    state.observe(["add"] * 4 + ["copy"] * 2 + ["reverse"] * 2, [1, 0, 1, 0, 0, 0, 1, 1])
    assert state.success == pytest.approx({"add": 0.5, "copy": 0.4, "reverse": 0.6})
    state.success["reverse"] = 1.0  # always passed: weight floored at 0.05, not 0
    kinds = state.pick_kinds(random.Random(0), 20_000, prioritize=True)
    share = {k: kinds.count(k) / len(kinds) for k in state.success}
    total = 0.5 + 0.6 + 0.05
    assert share == pytest.approx({"add": 0.5 / total, "copy": 0.6 / total, "reverse": 0.05 / total}, abs=0.01)
    # off: the kinds take turns
    assert sorted(state.pick_kinds(random.Random(0), 6, prioritize=False)) == ["add"] * 2 + ["copy"] * 2 + ["reverse"] * 2
    # the rates travel with the checkpoint (--resume)
    again = posttrain.RunState("rl", 0, ["add", "copy", "reverse"])
    again.load_state_dict(state.state_dict())
    assert again.success == state.success


def test_reply_logprob_counts_only_the_model_tokens(enc):
    c = chat.Chat(enc)
    model = tiny_model(enc.n_vocab, seed=1)
    prompt = c.prompt([{"role": "user", "content": "hi"}])
    body, tool = [104, 105, c.end], c.header("tool") + [111, 107, c.end] + c.header("assistant")
    ep = chat.Episode(chat.Task("add", "hi", "x"), prompt + body + tool + [120, c.end], len(prompt),
                           mask=[1] * len(body) + [0] * len(tool) + [1, 1])
    got = posttrain.reply_logprob(model, [ep, ep], temperature=0.7, eot=enc.eot_token)
    with torch.no_grad():
        logp = (model(torch.tensor([ep.ids]))[0] / 0.7).log_softmax(-1)
    want = sum(logp[len(prompt) + i - 1, ep.ids[len(prompt) + i]].item() for i, m in enumerate(ep.mask) if m)
    assert got.tolist() == pytest.approx([want, want], rel=1e-5)


def test_batched_generation_matches_full_forward(enc):
    """The cached, length-grouped decode gives the greedy tokens a full forward pass gives."""
    model = tiny_model(enc.n_vocab, seed=2).eval()
    rows = [[256, 5, 9, 7], [256, 1, 2], [256, 3, 4, 8], [256]]
    out = chat.generate(model, rows, [6, 4, 6, 5], 0.0, None, stop=-1)
    for row, new, n in zip(rows, out, [6, 4, 6, 5]):
        seq = list(row)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(row):]


# ----------------------------------------------------------------------------- end to end

def flags(stage, ckpt, out, corpus_dir, cache_dir, *extra):
    return [stage, "--init-from", str(ckpt), "--out-dir", str(out), "--data", corpus_dir, "--cache-dir", cache_dir,
            "--tasks", "add,copy", "--eval-n", "4", "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def sft_run(trained_checkpoint, corpus_dir, cache_dir, tmp_path_factory):
    """A 3-step SFT of the tiny trained checkpoint (context 64: short task kinds only)."""
    sft = tmp_path_factory.mktemp("sft")
    report = posttrain.main(flags("sft", trained_checkpoint, sft, corpus_dir, cache_dir, "--steps", "3",
                                  "--batch-size", "8", "--lr", "3e-3", "--judge-frac", "0.25"))
    return sft, report


def test_sft_then_rl_smoke_with_resume(sft_run, trained_checkpoint, corpus_dir, cache_dir, tmp_path, capsys):
    sft, report = sft_run
    rl = tmp_path / "rl"
    assert set(report["before"]) >= {"add", "copy", "all", "val_loss"} and report["steps"] == 3
    assert 0 <= report["after"]["all"] <= 1
    enc = data.load_encoding(str(sft))
    assert all(t in enc._special_tokens for t in chat.SPECIAL_TOKENS)
    # stopped after step 2 and resumed: the same weights as the uninterrupted run
    part = tmp_path / "sft_part"
    posttrain.main(flags("sft", trained_checkpoint, part, corpus_dir, cache_dir, "--steps", "3", "--batch-size",
                         "8", "--lr", "3e-3", "--judge-frac", "0.25", "--stop-at", "2", "--eval-n", "0"))
    posttrain.main(flags("sft", trained_checkpoint, part, corpus_dir, cache_dir, "--steps", "3", "--batch-size",
                         "8", "--lr", "3e-3", "--judge-frac", "0.25", "--resume", "--eval-n", "0"))
    from safetensors.torch import load_file
    a, b = load_file(str(sft / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # RL from the SFT checkpoint: two steps of group sampling, the k1.5 loss and PTX
    capsys.readouterr()
    report = posttrain.main(flags("rl", sft, rl, corpus_dir, cache_dir, "--steps", "2", "--batch-size", "2",
                                  "--group-size", "4", "--ptx-batch", "2", "--critic-coef", "0.1"))
    out = capsys.readouterr().out
    assert "rl step    2/2 | reward" in out and "| T 0.60 |" in out and "after RL" in out
    assert f"after RL vs {sft}: tasks gained/lost add +" in out and set(report["flips"]) == {"vs", "add", "copy", "all"}
    assert report["steps"] == 2 and os.path.exists(rl / "train_state.json")


def test_an_rl_batch_without_signal_changes_nothing(sft_run, monkeypatch):
    # every reply scores the same: no group carries a signal, so no optimizer step (and no PTX)
    from checkpoint import load_pretrained
    sft, _ = sft_run
    model, c = load_pretrained(str(sft)), chat.Chat(data.load_encoding(str(sft)))
    args = posttrain.parse_args(["rl", "--tasks", "add,copy", "--batch-size", "2", "--group-size", "3"])
    args.tasks, args.device = ["add", "copy"], "cpu"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(posttrain, "reward", lambda e, runner, penalty: 1.0)
    steps = []
    rec = posttrain.rl_step(model, c, args, 0, {}, None, chat.CachedRunner(), lambda *a: steps.append(a),
                            posttrain.RunState("rl", 0, args.tasks))
    assert steps == [] and rec["live"] == 0 and rec["loss"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_generate_chat_mode(sft_run, trained_checkpoint, capsys):
    """generate.py --chat replies as posttrain.py's own greedy rollout does (two decode paths)."""
    import generate
    from checkpoint import load_pretrained
    sft = str(sft_run[0])
    c = chat.Chat(data.load_encoding(sft))
    ep = chat.rollout(load_pretrained(sft), c, [chat.Task("add", "1+2=", "3")], 0.0, None, None)[0]
    capsys.readouterr()
    generate.main(["--out", sft, "--chat", "--prompt", "1+2=", "--temperature", "0", "--kv-policy", "full",
                   "--max-new-tokens", str(chat.BUDGET["add"])])
    text, last = capsys.readouterr().out.rsplit("\n[generate]", 1)
    want = c.enc.decode([t for t in ep.ids[ep.prompt_len:] if t != c.end])  # (specials print as their text)
    assert text == want and f"generated {len(ep.mask)}" in last
    with pytest.raises(SystemExit, match="run `python posttrain.py sft` on it first"):
        generate.main(["--out", str(trained_checkpoint), "--chat", "--prompt", "1+2="])


@pytest.mark.parametrize("argv, said", [
    (["rl", "--init-from", "/nonexistent"], "no checkpoint in '/nonexistent'"),
    (["sft", "--tasks", "add,poetry"], "--tasks: unknown kind(s) poetry"),
    (["sft", "--steps", "0"], "--steps must be at least 1"),
    (["rl", "--group-size", "1"], "--group-size must be at least 2"),
    (["rl", "--resume", "--out-dir", "/nonexistent"], "--resume: no checkpoint in '/nonexistent'"),
    (["sft", "--seed", "1180591620717411303424"], "--seed must be at most 17592186044416"),  # issue 27
    (["sft", "--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["sft", "--out-dir", __file__], "is a file, not a folder"),
])
def test_bad_input_is_one_line(argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        posttrain.cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and said in err and err.count("\n") == 1


def test_rl_on_a_base_checkpoint_says_run_sft_first(trained_checkpoint, corpus_dir, cache_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        posttrain.cli(flags("rl", trained_checkpoint, tmp_path, corpus_dir, cache_dir))
    assert "run `python posttrain.py sft` on it first" in capsys.readouterr().err


def test_bench_rl_compares_the_same_replies(sft_run, tmp_path, monkeypatch, capsys):
    """bench.py rl: both arms sample the same replies (it raises otherwise) and the JSON has both."""
    import bench
    sft, _ = sft_run
    monkeypatch.chdir(tmp_path)
    bench.main(["rl", "--ckpt", str(sft), "--rounds", "2", "--prompts", "4", "--group", "2", "--workers", "2"])
    rows = json.load(open(tmp_path / "out" / "bench" / "rl.json"))["rows"]
    assert [r["executor runs"] for r in rows] == ["one by one", "side by side (2 threads)"]
    assert all(r["replies"] == 2 * 4 * 2 for r in rows)
