"""generate.py: sample from the checkpoint in out/ with a compressed (KeepKV) latent KV cache.

    python generate.py --prompt "def fib(n):" --kv-budget 0.1            # keep 10% of the prompt
    python generate.py --prompt-file some.py --kv-policy h2o --max-new-tokens 200
    python generate.py --prompt "x = 1" --kv-select snapkv       # KeepKV merging SnapKV's drops
    echo "import os" | python generate.py --kv-policy full --temperature 0
    python generate.py --kv-cache per-head --kv-budget 0.1              # the per-head cache instead

It decodes from the absorbed MLA latent cache, as DeepSeek-V3's own inference does: per token and
layer the normalised latent c and the rotary key (keepkv_latent.py); `--kv-policy full` is that
cache uncompressed. `--kv-cache per-head` runs the same policies on the per-head keys and values
instead (keepkv.py), for teaching and comparison: it is H(Dn+Dr+Dv) / (C+Dr) times larger per entry.
The prompt is prefilled in one pass (exact attention), compressed once to the budget, and every
new token then enters the cache while one entry leaves. The decode step has static shapes, so
--compile compiles it once. The text streams to stdout; a last line reports decode speed, lengths
and the cache's bytes against the full latent cache and against the full per-head cache.
"""
import codecs
import math
import os
import sys
import time

import torch

import data
import hf
import keepkv
import keepkv_latent
from checkpoint import load_pretrained
from config import DefaultsHelpFormatter, parser
from parallel import pick_device


def parse_args(argv=None):
    p = parser("generate.py", __doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ckpt", "--out-dir", "--out", dest="out", default="out",
                   help="the checkpoint to sample from: a folder written by train.py or posttrain.py, or a "
                        "Hugging Face folder (DeepSeek-V3 layout); --out-dir, train.py's name for it, also works")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: read stdin)")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-policy", default="keepkv", choices=keepkv.POLICIES)
    p.add_argument("--kv-cache", default="latent", choices=["latent", "per-head"],
                   help="which cache to decode from and compress: the absorbed latent (C+Dr per token) or per-head")
    p.add_argument("--kv-budget", type=float, default=0.1,
                   help="fraction of the prompt the cache keeps, in (0, 1]")
    p.add_argument("--kv-select", default=keepkv.KVConfig.select, choices=keepkv.SELECTIONS,
                   help="keepkv, convex: the selection policy whose dropped entries they merge")
    p.add_argument("--kv-alpha", type=float, default=keepkv.KVConfig.alpha,
                   help="EMA of ZIP's predicted score (0 = the current query only)")
    p.add_argument("--kv-window", type=int, default=keepkv.KVConfig.window,
                   help="the smallest cache holds 4 sinks + this many entries (short prompts)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--chat", action="store_true",
                   help="a posttrain.py checkpoint: the prompt is a user turn, the reply ends at <|im_end|>")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not 0 < args.kv_budget <= 1:
        p.error(f"--kv-budget must be in (0, 1] (the fraction of the prompt kept), got {args.kv_budget}")
    for name, v, low, most in (("max-new-tokens", args.max_new_tokens, 1, 2**63 - 1),
                               ("temperature", args.temperature, 0, math.inf), ("top-k", args.top_k, 0, 2**63 - 1),
                               ("seed", args.seed, 0, 2**64 - 1), ("kv-window", args.kv_window, 1, 2**63 - 1)):
        # (kv-window: the recent tokens always kept; seed: at most what torch.Generator takes)
        if not v >= low:  # (NaN fails too)
            p.error(f"--{name} must be at least {low}, got {v}")
        if not v <= most or v == math.inf:
            p.error(f"--{name} must be {'a finite number' if most == math.inf else f'at most {most}'}, got {v}")
    if not 0 <= args.kv_alpha < 1:
        p.error(f"--kv-alpha must be in [0, 1) (the weight of the past in the predicted score; "
                f"0 = the current query only), got {args.kv_alpha:g}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--ckpt {args.out!r} is a file, not a folder; pass the checkpoint folder train.py "
                f"wrote (or a Hugging Face folder)")
    if args.kv_window < 1:
        p.error(f"--kv-window must be at least 1 (the smallest cache holds 4 sinks + window entries), got {args.kv_window}")
    if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
        what = "a folder" if os.path.isdir(args.prompt_file) else "no such file"
        p.error(f"--prompt-file {args.prompt_file!r}: {what}; pass an existing file, "
                f"--prompt TEXT, or the prompt on stdin")
    try:
        args.device = str(pick_device(args.device))
    except ValueError as e:
        p.error(str(e))
    return args


def sample(logits, temperature: float, gen, top_k: int = 0) -> torch.Tensor:
    """logits [B, V] -> tokens [B]: argmax at temperature 0, else a draw from softmax(logits / temperature)
    over the top_k likeliest (0: all), with an explicit generator (reproducible per seed)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


def decode_step(model, caches, token, pos):
    """One token [B, 1] at position pos [1] -> next-token logits [B, V]."""
    return model(token, pos, caches)[:, -1]


def decode(model, caches, logits, pos: int, max_new: list[int], temperature: float, gen, stop=(), top_k: int = 0,
           step=decode_step, on_token=None) -> list[list[int]]:
    """The decode loop (this file's and chat.py's): from the prefill's next-token logits [B, V],
    with the prompt's last token at pos - 1, sample a token for every row and feed it back, until
    each row b has written a token in `stop` or max_new[b] tokens. Finished rows ride along until
    the batch is done (static shapes) but write nothing. on_token(tok [B]) sees every step."""
    out, done = [[] for _ in max_new], [m <= 0 for m in max_new]
    for t in range(max(max_new)):
        tok = sample(logits, temperature, gen, top_k)
        for b, v in enumerate(tok.tolist()):
            if not done[b]:
                out[b].append(v)
                done[b] = v in stop or len(out[b]) >= max_new[b]
        if on_token is not None:
            on_token(tok)
        if all(done):
            break
        logits = step(model, caches, tok[:, None], torch.tensor([pos + t], device=tok.device))
    return out


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"error: --prompt-file {args.prompt_file!r} is not readable UTF-8 text ({e}); "
                     f"pass a text file")
    return sys.stdin.read()


def _kb(n):
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    prompt = read_prompt(args)  # before the model loads: a bad prompt file fails at once
    try:
        if hf.is_hf_folder(args.out):  # a released checkpoint's layout (hf.py), read as it is
            model, enc = hf.load_model(args.out, args.device).eval(), hf.load_tokenizer(args.out)
        else:
            model = load_pretrained(args.out, args.device).eval()
            enc = data.load_encoding(args.out)
    except (FileNotFoundError, ValueError) as e:  # no checkpoint, or a corrupt / mismatched one
        sys.exit(f"error: {e}")
    ctx = model.args.max_seq_len
    stop = {enc.eot_token}
    if args.chat:  # the prompt as a user turn in Kimi's chat format (chat.py), then the assistant's header
        import chat  # (here, not at the top: chat.py builds on this file's decode loop)
        try:
            c = chat.Chat(enc)
        except ValueError as e:  # a base checkpoint: its tokenizer has no chat tokens
            sys.exit(f"error: --chat: {e}")
        ids, stop = c.prompt([{"role": "user", "content": prompt}]), {enc.eot_token, c.end}
    else:
        ids = enc.encode_ordinary(prompt) or [enc.eot_token]   # empty prompt: start a document
    P = len(ids)
    if max(ids) >= model.args.vocab_size:
        sys.exit(f"error: the tokenizer in {args.out} comes from another model than its weights: the "
                 f"prompt has token id {max(ids)}, the model {model.args.vocab_size} embeddings; restore "
                 f"the tokenizer files saved with the weights")
    if P >= ctx:
        sys.exit(f"error: the prompt is {P} tokens but the model's context is {ctx} "
                 f"(max_seq_len), with room for at least one new token; shorten the prompt")
    n_new = min(args.max_new_tokens, ctx - P)
    if n_new < args.max_new_tokens:
        print(f"note: generating {n_new} tokens, the rest of the model's {ctx}-token context",
              file=sys.stderr)
    cfg = keepkv.KVConfig(policy=args.kv_policy, budget=args.kv_budget, alpha=args.kv_alpha,
                          window=args.kv_window, select=args.kv_select)
    make = keepkv_latent.make_caches if args.kv_cache == "latent" else keepkv.make_caches
    caches = make(model, 1, P, cfg, max_new_tokens=n_new)
    step = torch.compile(decode_step, fullgraph=True) if args.compile else decode_step

    gen = torch.Generator(args.device).manual_seed(args.seed)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens may split a character
    prompt = torch.tensor([ids], device=args.device)
    logits = model(prompt, torch.arange(P, device=args.device), caches)[:, -1]  # prefill + compression
    times = []  # when each token was sampled: the speed counts from the second (the first step may compile)

    def show(tok):
        if int(tok[0]) not in stop:
            print(utf8.decode(enc.decode_single_token_bytes(int(tok[0]))), end="", flush=True)
        times.append(time.perf_counter())

    n = len(decode(model, caches, logits, P, [n_new], args.temperature, gen, stop, args.top_k, step, show)[0])
    print(utf8.decode(b"", final=True))
    speed = f"{(len(times) - 2) / (times[-1] - times[1]):.1f} tok/s" if len(times) > 2 else "n/a (too few steps)"
    used = sum(c.nbytes() for c in caches)
    latent = keepkv_latent.full_latent_bytes(model, 1, P + n_new)
    per_head = keepkv.full_cache_bytes(model, 1, P + n_new)
    name = args.kv_policy if args.kv_policy == "full" else f"{args.kv_policy} (budget {args.kv_budget:g})"
    if args.kv_policy in keepkv.MERGING:
        name += f" merging {args.kv_select}'s drops"
    print(f"[generate] decode {speed} | prompt {P} tokens, generated {n} | {args.kv_cache} KV cache "
          f"{name}: {_kb(used)} = {used / latent:.1%} of the full latent cache ({_kb(latent)}), "
          f"{used / per_head:.1%} of the full per-head cache ({_kb(per_head)}); votes, scores, "
          f"positions included")


if __name__ == "__main__":
    main()
