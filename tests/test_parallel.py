"""FSDP2 with 2 CPU processes (gloo): the same losses as 1 process, distributed Muon equal to
single-process Muon, checkpoints that move between rank counts, and clean failures."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import muonclip
import train
from checkpoint import load_pretrained
from parallel import Dist
from conftest import ROOT, metrics, train_flags

# QK-Clip must act: a logit threshold the tiny model passes within a few steps at this lr
MUON_FLAGS = ["--optimizer", "muonclip", "--qk-clip-tau", "0.03", "--lr", "3e-2"]
# seq-len 30: the final eval's last batch has 1 row, so one rank scores nothing (and must still join)
COMMON = ["--max-steps", "6", "--eval-every", "3", "--grad-accum", "2", "--seq-len", "30"]


def torchrun(*args, nproc=2, timeout=300, script=os.path.join(ROOT, "train.py")):
    """train.py under torchrun, one thread per rank (two ranks share the two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", script, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def two_ranks_without_torchrun(*args, script, timeout=120):
    """Two ranks started by hand, as torchrun would set them up, each run to its own end. torchrun
    kills the ranks still running once one fails: a test of how *every* rank fails needs each
    rank left to finish (under torchrun, rank 0 was now and then killed before its last line)."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


# train.py run as a script, then the names of the threads still alive as the process exits
THREADS_AT_EXIT = f"""
import os, runpy, sys
sys.path.insert(0, {ROOT!r})  # as when train.py itself is the script
try:
    runpy.run_path({os.path.join(ROOT, "train.py")!r}, run_name="__main__")
finally:
    names = sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    # one write of one line: two ranks share the pipe, and print's separate newline could interleave
    sys.stdout.write(f"rank {{os.environ['RANK']}} threads at exit: {{names}}\\n")
    sys.stdout.flush()
"""


def thread_names() -> list[str]:
    """The names of this process's threads (Linux), or [] where /proc does not list them."""
    if not os.path.isdir("/proc/self/task"):
        return []
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))


def assert_no_gloo_threads_at_exit(r):
    """gloo's threads are joined before the interpreter exits (Dist.close): left running, they
    abort a rank at exit now and then with SIGABRT (the CI flake of issue 14)."""
    if os.path.isdir("/proc/self/task"):
        exits = dict(re.findall(r"rank (\d+) threads at exit: (\[[^]]*\])", r.stdout))
        assert sorted(exits) == ["0", "1"] and not any("gloo" in v for v in exits.values()), r.stdout[-2000:]


def assert_same_run(a, b, rtol=1e-5):
    """Same losses step by step (fp32: only the order of the gradient sums differs), same clips."""
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=rtol), (s, a[s]["loss"], b[s]["loss"])
        assert a[s].get("heads_clipped") == b[s].get("heads_clipped"), s
    assert b[6]["val_loss"] == pytest.approx(a[6]["val_loss"], rel=rtol)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_dir, cache_dir, one_thread):
    """Uninterrupted 1-rank and 2-rank runs with each optimizer, made once for the module."""
    out = {}
    for name, flags in (("muonclip", MUON_FLAGS), ("adamw", ["--optimizer", "adamw"])):
        one, two = tmp_path_factory.mktemp(f"{name}1"), tmp_path_factory.mktemp(f"{name}2")
        train.main(train_flags(corpus_dir, cache_dir, one, *COMMON, *flags))
        r = torchrun(*train_flags(corpus_dir, cache_dir, two, *COMMON, *flags))
        assert r.returncode == 0, r.stdout + r.stderr
        out[name] = (one, two, r.stdout)
    return out


@pytest.mark.parametrize("optimizer", ["muonclip", "adamw"])
def test_two_ranks_give_the_losses_of_one(runs, optimizer):
    one, two, stdout = runs[optimizer]
    a, b = metrics(one), metrics(two)
    assert_same_run(a, b)
    if optimizer == "muonclip":
        assert sum(r["heads_clipped"] for r in a.values()) > 0   # the clip really ran
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:  # the consolidated weights of the 2-rank run: whole tensors, same values
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)
    assert stdout.count("step     6/6") == 1 and "FSDP2 over 2 ranks" in stdout  # rank 0 prints alone
    assert len(metrics(two)) == 6                               # and writes metrics alone
    load_pretrained(str(two))                                   # what generate.py reads


def test_two_rank_checkpoint_resumes_with_one_and_two_ranks(runs, corpus_dir, cache_dir, tmp_path):
    one, _, _ = runs["muonclip"]
    part = tmp_path / "part"
    r = torchrun(*train_flags(corpus_dir, cache_dir, part, *COMMON, *MUON_FLAGS, "--stop-at", "3"))
    assert r.returncode == 0, r.stdout + r.stderr
    shards = os.listdir(part / "train_state")
    assert len(shards) == 2 and all(f.endswith(".safetensors") for f in shards)  # one per rank
    again = tmp_path / "again"
    subprocess.run(["cp", "-r", str(part), str(again)], check=True)
    train.main(train_flags(corpus_dir, cache_dir, part, *COMMON, *MUON_FLAGS, "--resume"))
    r = torchrun(*train_flags(corpus_dir, cache_dir, again, *COMMON, *MUON_FLAGS, "--resume"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    assert_same_run(metrics(one), metrics(part))
    assert_same_run(metrics(one), metrics(again))


def test_two_rank_adamw_checkpoint_resumes_with_one_rank(runs, corpus_dir, cache_dir, tmp_path):
    one, _, _ = runs["adamw"]
    flags = [*COMMON, "--optimizer", "adamw"]
    script, out = tmp_path / "threads_at_exit.py", tmp_path / "out"
    script.write_text(THREADS_AT_EXIT)
    r = torchrun(*train_flags(corpus_dir, cache_dir, out, *flags, "--stop-at", "3"), script=str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_no_gloo_threads_at_exit(r)
    train.main(train_flags(corpus_dir, cache_dir, out, *flags, "--resume"))
    assert_same_run(metrics(one), metrics(out))


def test_ctrl_c_stops_every_rank_at_the_same_step_and_saves(corpus_dir, cache_dir, tmp_path):
    """Ctrl-C reaches the ranks at different moments; the stop flag rides on the step's loss
    all-reduce, so all ranks save at the same step instead of one waiting in a collective."""
    import signal
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "train.py"),
                          *train_flags(corpus_dir, cache_dir, tmp_path, "--max-steps", "100000",
                                       "--optimizer", "adamw", "--save-every", "100000")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    for line in p.stdout:
        if line.startswith("step"):
            break
    os.killpg(p.pid, signal.SIGINT)  # the terminal's Ctrl-C: torchrun and both ranks
    out = p.communicate(timeout=120)[0]
    assert "stopped at step" in out, out[-3000:]
    step = json.load(open(tmp_path / "train_state.json"))["step"]
    assert step >= 1 and json.load(open(tmp_path / "config.json"))["step"] == step
    assert len(os.listdir(tmp_path / "train_state")) == 2


def test_resume_with_a_different_config_fails_on_every_rank(runs, corpus_dir, cache_dir, tmp_path):
    one, _, _ = runs["adamw"]
    script = tmp_path / "threads_at_exit.py"
    script.write_text(THREADS_AT_EXIT)
    ranks = two_ranks_without_torchrun(*train_flags(corpus_dir, cache_dir, one, *COMMON, "--optimizer",
                                                    "adamw", "--n-layers", "3", "--resume"), script=str(script))
    for rank, r in enumerate(ranks):  # each rank stops with the message, none is left waiting
        assert r.returncode != 0, r.stdout + r.stderr
        assert "n_layers=2 but this run has n_layers=3" in r.stderr, r.stderr[-2000:]
    assert "(rank 1)" in ranks[1].stderr
    # the error's traceback no longer holds the process group
    assert_no_gloo_threads_at_exit(subprocess.CompletedProcess([], 1, ranks[0].stdout + ranks[1].stdout))


@pytest.mark.parametrize("env, flags, message", [
    ({"WORLD_SIZE": "2"}, ["--batch-size", "6", "--grad-accum", "2"], "use a multiple of 4"),
    ({"WORLD_SIZE": "1"}, ["--backend", "nccl"], "--backend nccl needs CUDA"),
])
def test_bad_distributed_input_fails_before_any_collective(corpus_dir, cache_dir, tmp_path,
                                                           monkeypatch, env, flags, message):
    monkeypatch.setenv("RANK", "0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        train.main(train_flags(corpus_dir, cache_dir, tmp_path, *flags))


def test_a_process_group_that_cannot_start_names_the_cause(corpus_dir, cache_dir, tmp_path, monkeypatch):
    import socket
    with socket.socket() as taken:  # the rendezvous port is already in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(taken.getsockname()[1])}.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ValueError, match="'gloo' process group could not start.*port is free") as e:
            train.main(train_flags(corpus_dir, cache_dir, tmp_path, "--dist-timeout", "20"))
    assert "--backend gloo" not in str(e.value)


# ----------------------------------------------------------------------------- distributed Muon

class Toy(nn.Module):
    """Shapes that shard unevenly over 2 ranks: 5 and 7 rows, 3 experts; a 1-row matrix and a
    1-expert stack, of which rank 1 holds nothing; and more matrices than ranks, so the
    all_to_all rounds carry several sizes and the last round is half empty."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.a = nn.Linear(6, 5, bias=False)
        self.b = nn.Linear(5, 7, bias=False)
        self.c = nn.Linear(7, 9, bias=False)
        self.d = nn.Linear(9, 1, bias=False)
        self.norm = nn.RMSNorm(9)
        self.experts = nn.Parameter(torch.randn(3, 4, 9))
        self.expert = nn.Parameter(torch.randn(1, 4, 9))


def _muon_worker(rank, world, store, out_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ref, model = Toy(), Toy()
    model.load_state_dict(ref.state_dict())
    fully_shard(model, mesh=mesh)
    opts = [muonclip.MuonClip(m, lr=0.05, weight_decay=0.1, qk_clip_tau=None) for m in (ref, model)]
    for step in range(3):  # several steps: momentum carries over
        gen = torch.Generator().manual_seed(step)
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = distribute_tensor(p.grad, mesh, [Shard(0)], src_data_rank=None)
            assert q.to_local().shape[0] == muonclip.shard_rows(p.shape[0], world)[rank], name
        for opt in opts:
            opt.step()
    stats = (opts[0].last_stats, opts[1].last_stats)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    # QK-Clip's row scaling on a row-sharded weight
    factors = torch.linspace(0.5, 1.5, 7)
    muonclip.scale_rows_(model.b.weight, factors)
    scaled = model.b.weight.full_tensor()
    ref = {n: p.detach() for n, p in ref.named_parameters()}
    del model, opts, q  # the FSDP model holds the process group: free it before close()
    Dist(rank, world, mesh).close()
    threads = thread_names()
    if rank == 0:
        torch.save({"ref": ref, "full": full, "stats": stats, "scaled": scaled, "factors": factors,
                    "threads": threads}, out_path)


def test_distributed_muon_equals_single_process_muon(tmp_path):
    out = tmp_path / "result.pt"
    torch.multiprocessing.spawn(_muon_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    res = torch.load(out, weights_only=True)
    for name, p in res["ref"].items():
        torch.testing.assert_close(res["full"][name], p.detach(), rtol=1e-6, atol=1e-7, msg=name)
    single, sharded = res["stats"]
    assert sharded["update_rms"] == pytest.approx(single["update_rms"], rel=1e-5)
    assert sharded["adamw_update_rms"] == pytest.approx(single["adamw_update_rms"], rel=1e-5)
    torch.testing.assert_close(res["scaled"], res["full"]["b.weight"] * res["factors"][:, None])
    assert not any("gloo" in name for name in res["threads"]), res["threads"]  # Dist.close joined them


def test_shard_rows_is_torch_chunk():
    for n in range(0, 12):
        for w in (1, 2, 3, 4):
            expect = [len(c) for c in torch.arange(n).chunk(w)] if n else []
            assert muonclip.shard_rows(n, w) == expect + [0] * (w - len(expect)), (n, w)
