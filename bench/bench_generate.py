"""Generation and ChatCORE speed on one GPU: single-stream decode, batched throughput, ChatCORE wall time.

    python bench/bench_generate.py --out bench/.work/generate.json            (CUDA: d12 and d20)
    python bench/bench_generate.py --smoke --out /tmp/gen.json                 (CPU, tiny sizes, seconds)

Models are random-init nanochat GPTs (d12: n_embd 768, vocab 32768, SSSL; d20: n_embd 1280), weights stored
in the compute dtype as trainer.eval and trainer.chat load them. Prompts are random token ids. The models never
choose <|assistant_end|> or <|bos|> (their output rows are zeroed), so every generation runs to its token limit:
the ChatCORE times are an upper bound for a trained model, which stops when it has answered.

ChatCORE: the six tasks at their real sizes (ARC-Easy 2,376, ARC-Challenge 1,172, MMLU 14,042, GSM8K 1,319,
HumanEval 164, SpellingBee 256), as synthetic problems whose prompt lengths roughly follow the real tasks'
(rendered by a byte-level stand-in tokenizer, so no tokenizer file is needed); with `--data-dir D
--tokenizer T`, the real tasks found in D instead. Two budgets: `full` (every problem, 512 new tokens,
nanochat's chat_eval) and `sft` (every categorical problem, 24 per generative task: chat_sft's in-training
ChatCORE). Baseline: nanochat's own Engine when `nanochat` is importable, else the measured 20.4 tokens/s
(issue 7).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, ChatTokenizer  # noqa: E402
from pipeline.tasks.mmlu import render_mc  # noqa: E402
from trainer.config import GPTConfig  # noqa: E402
from trainer.engine import Engine  # noqa: E402
from trainer.evaluate import (EvalTask, _eval_mode, _try_load, judge_final_answer,  # noqa: E402
                              judge_humaneval, judge_letter, run_categorical, run_generative)
from trainer.inference import cast_for_inference  # noqa: E402
from trainer.model import GPT  # noqa: E402

BASELINE_TOK_S = 20.4  # nanochat's Engine, d12, H200, torch 2.11 (issue 7)
TARGETS = {"single_d12_tok_s": 200.0, "batched_d20_tok_s": 5000.0, "chatcore_full_d20_s": 600.0}
# real sizes, and a rough median prompt length in tokens (nanochat's tokenizer) with a log-normal spread
TASKS = {  # name: (problems, median prompt tokens, sigma, kind)
    "ARC-Easy": (2376, 85, 0.3, "categorical"), "ARC-Challenge": (1172, 100, 0.3, "categorical"),
    "MMLU": (14042, 130, 0.6, "categorical"), "GSM8K": (1319, 95, 0.3, "generative"),
    "HumanEval": (164, 140, 0.5, "generative"), "SpellingBee": (256, 30, 0.1, "generative"),
}


def synthetic_tokenizer(vocab: int) -> ChatTokenizer:
    """A byte-level BPE stand-in with `vocab` ids: the 256 bytes, then ' ' + two letters, letter pairs,
    letter triples, ... (each reachable by merges), then the nine special tokens."""
    import itertools
    import string

    import tiktoken
    n = vocab - len(SPECIAL_TOKENS)
    ranks = {bytes([b]): b for b in range(256)}
    low = string.ascii_lowercase
    pieces = itertools.chain((" " + a for a in low), (a + b for a in low for b in low),
                             (" " + a + b for a in low for b in low), (a + b + c for a in low for b in low for c in low),
                             (" " + a + b + c for a in low for b in low for c in low))
    for p in pieces:
        if len(ranks) >= n:
            break
        ranks.setdefault(p.encode(), len(ranks))
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return ChatTokenizer(tiktoken.Encoding(name="bench-synthetic", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                           special_tokens=specials))


_PAIRS = [" " + a + b for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"]


def _words(rng, tokens: int) -> str:
    """About `tokens` tokens of text: ' xy' is one token of the stand-in tokenizer."""
    return "".join(_PAIRS[k] for k in rng.integers(0, len(_PAIRS), max(1, int(tokens))))


def synthetic_task(name: str, n: int, median: int, sigma: float, seed: int = 0) -> EvalTask:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(median), sigma, n), 8, 2000).astype(int)
    items = []
    kind = TASKS.get(name, (0, 0, 0, "generative"))[3]
    for i, length in enumerate(lengths):
        if kind == "categorical":
            letters = ["A", "B", "C", "D"]
            q = render_mc(_words(rng, length - 40), letters, [_words(rng, 4) for _ in letters])
            items.append({"messages": [{"role": "user", "content": q},
                                       {"role": "assistant", "content": letters[i % 4]}], "letters": letters})
        elif name == "HumanEval":
            prompt = f"def f(x):\n    \"\"\"{_words(rng, length - 20)}\"\"\"\n"
            items.append({"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": prompt + "    return x + 1\n"}],
                          "entry_point": "f", "test": "def check(f):\n    assert f(1) == 2\n"})
        else:
            items.append({"messages": [{"role": "user", "content": _words(rng, length - 10)},
                                       {"role": "assistant", "content": f"so #### {i % 97}"}]})
    judge = judge_letter if kind == "categorical" else judge_humaneval if name == "HumanEval" else judge_final_answer
    return EvalTask(name, items, kind, judge, [{"path": f"synthetic:{name}", "rows": n}])


def build(depth: int, n_embd: int | None, vocab: int, seq_len: int, device, never: tuple[int, ...] = ()) -> GPT:
    """A random-init model; the output rows of the `never` tokens are zeroed, so greedy decoding does not pick
    them (some other logit is positive): with the terminal tokens there, every generation runs to its limit."""
    C = n_embd or -(-depth * 64 // 128) * 128
    heads = max(1, C // 128)
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=C,
                    window_pattern="SSSL")
    torch.manual_seed(42)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():
        for t in never:
            model.lm_head.weight[t].zero_()
    return cast_for_inference(model.eval())


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def bench_single(engine: Engine, vocab_hi: int, prompt_len: int, new: int, device, repeats: int) -> dict:
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, vocab_hi, prompt_len).tolist()
    engine.generate(prompt, max_tokens=8)  # warm-up (kernels, allocator)
    _, prefill = timed(lambda: engine.generate(prompt, max_tokens=1), device)
    best, n = math.inf, 0
    for _ in range(repeats):
        out, dt = timed(lambda: engine.generate(prompt, max_tokens=new), device)
        if dt < best:
            best, n = dt, len(out)
    decode_s = max(best - prefill, 1e-9)
    return {"prompt": prompt_len, "new_tokens": n, "seconds": best, "prefill_s": prefill,
            "tok_s": n / best, "decode_tok_s": max(n - 1, 0) / decode_s}


def bench_batched(engine: Engine, vocab_hi: int, prompt_len: int, new: int, batch: int, device) -> dict:
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, vocab_hi, prompt_len).tolist() for _ in range(batch)]
    engine.generate_batch(prompts[:2], max_tokens=4)
    outs, dt = timed(lambda: engine.generate_batch(prompts, max_tokens=new), device)
    n = sum(len(o) for o in outs)
    return {"batch": batch, "prompt": prompt_len, "new_tokens": n, "seconds": dt, "tok_s": n / dt}


def bench_nanochat(depth: int, n_embd: int | None, vocab: int, seq_len: int, prompt_len: int, new: int,
                   tok: ChatTokenizer, device) -> dict | None:
    """nanochat's own Engine on the same shape, when the nanochat package can be imported."""
    try:
        from nanochat.engine import Engine as NEngine
        from nanochat.gpt import GPT as NGPT, GPTConfig as NConfig
    except Exception as e:  # not installed (the usual case)
        return {"error": f"nanochat not importable: {type(e).__name__}: {e}"}
    try:
        C = n_embd or -(-depth * 64 // 128) * 128
        cfg = NConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=C // 128, n_kv_head=C // 128,
                      n_embd=C)
        with torch.device("meta"):
            model = NGPT(cfg)
        model.to_empty(device=device)
        model.init_weights()
        model.eval()

        class Tok:  # the calls nanochat's Engine makes
            def encode_special(self, s):
                return tok.special_id(s)

            def get_bos_token_id(self):
                return tok.bos_id

            def encode(self, s, *a, **k):
                return tok.encode(s)

            def decode(self, ids):
                return tok.decode(ids)

        eng = NEngine(model, Tok())
        prompt = np.random.default_rng(1).integers(0, vocab - 16, prompt_len).tolist()

        def run(n):
            return eng.generate_batch(prompt, num_samples=1, max_tokens=n, temperature=0.0)

        run(8)
        _, dt = timed(lambda: run(new), device)
        return {"prompt": prompt_len, "new_tokens": new, "seconds": dt, "tok_s": new / dt}
    except Exception as e:
        return {"error": f"nanochat Engine failed: {type(e).__name__}: {e}"}


class _NoTools:
    """The tokenizer calls Engine makes: BOS (a real id: it pads) and tool ids the model cannot produce."""
    bos_id = 299

    def special_id(self, name):
        return 1001 + hash(name) % 50


def decode_checks(device) -> dict:
    """The decode paths against the full forward, on this device, without pytest (the GPU image has none):
    the sliced-cache, static and CUDA-graph steps in the compute dtype over 500 teacher-forced steps across
    the 512-token window, with and without left padding (max |dlogit|, argmax agreement); then, in fp32, the
    graphed engine's tokens against plain decoding. The same checks as tests/test_model.py's CUDA tests."""
    from trainer.engine import _GraphedStep
    out: dict = {}

    def tiny(fp32: bool):
        cfg = GPTConfig(sequence_len=512, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                        window_pattern="SSSL")
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device=device)
        model.init_weights()  # the compute dtype: bf16 on CUDA
        if fp32:
            model.dtype = torch.float32
            model.float()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))
        return model.eval()

    model = tiny(False)
    modes = ["sliced", "static"] + (["graph"] if device.type == "cuda" else [])
    T, T0 = 600, 100
    idx = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        full = model(idx)
        for mode in modes:
            for pad in (0, 8):
                cache = model.new_kv_cache(2, T if mode == "sliced" else 640)
                cache.set_padding([pad, 0])
                zeros = torch.zeros(pad, dtype=torch.long, device=device)
                pre = model(torch.stack([torch.cat([zeros, idx[0, :T0]]), idx[1, :T0 + pad]]), kv_cache=cache)
                if mode != "sliced":
                    cache.make_static()
                step = _GraphedStep(model, cache) if mode == "graph" else (lambda t, c=cache: model(t, kv_cache=c)[:, -1])
                dec = torch.stack([step(torch.stack([idx[0, T0 + t], idx[1, T0 + pad + t]])[:, None]).clone()
                                   for t in range(T - T0 - pad)], dim=1)
                diffs, agrees = [], []
                for b, got in ((0, torch.cat([pre[0, pad:], dec[0]])), (1, torch.cat([pre[1], dec[1]]))):
                    ref = full[b, :got.size(0)]
                    diffs.append(float((got - ref).abs().max()))
                    agrees.append(float((got.argmax(-1) == ref.argmax(-1)).float().mean()))
                ok = max(diffs) < 0.25 and min(agrees) > 0.8
                if mode == "graph":
                    ok = ok and step.graph is not None
                out[f"{mode}/pad{pad}"] = {"max_dlogit": max(diffs), "argmax_agree": min(agrees), "ok": ok}
    model32 = tiny(True)
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(3)).tolist() for n in (50, 7, 130)]
    plain = Engine(model32, _NoTools(), cuda_graphs=False)
    static = Engine(model32, _NoTools(), cuda_graphs=None if device.type == "cuda" else True)
    want = plain.generate_batch(prompts, max_tokens=40)
    same = static.generate_batch(prompts, max_tokens=40) == want
    same = same and [static.generate(p, max_tokens=40) for p in prompts] == [plain.generate(p, max_tokens=40)
                                                                           for p in prompts]
    out["engine_fp32_tokens_equal"] = {"ok": same}
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def bench_chatcore(model, tok, tasks: dict[str, EvalTask], budget: str, max_tokens: int, cat_batch: int,
                   gen_batch: int, device) -> dict:
    per_task = {}
    with _eval_mode(model):
        for name, task in tasks.items():
            if task.eval_type == "categorical":
                n = len(task)
                _, dt = timed(lambda: run_categorical(model, tok, task, cat_batch, -1), device)
            else:
                n = len(task) if budget == "full" else min(24, len(task))
                _, dt = timed(lambda: run_generative(model, tok, task, n, max_tokens, gen_batch), device)
            per_task[name] = {"problems": n, "seconds": dt}
    return {"budget": budget, "max_tokens": max_tokens, "seconds": sum(t["seconds"] for t in per_task.values()),
            "tasks": per_task}


def load_tasks(args, tok, sizes: dict) -> tuple[dict[str, EvalTask], dict[str, str]]:
    tasks, source = {}, {}
    for name, (n, median, sigma, _) in sizes.items():
        task = None
        if args.data_dir is not None:
            task, reason = _try_load(name, args.data_dir)
            if task is not None:
                source[name] = "real: " + ", ".join(f["path"] for f in task.files)
        if task is None:
            task = synthetic_task(name, n, median, sigma)
            source[name] = f"synthetic ({n} problems, median prompt ~{median} tokens)"
        tasks[name] = task
    return tasks, source


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = ap.add_argument
    a("--out", type=Path, required=True, help="write the results here (JSON)")
    a("--smoke", action="store_true", help="tiny sizes, any device (a test runs this on the CPU)")
    a("--configs", default="d12,d20")
    a("--batches", default="1,8,32,128")
    a("--prompt-len", type=int, default=200)
    a("--new-tokens", type=int, default=256)
    a("--repeats", type=int, default=3)
    a("--chatcore", default="full,sft", help="ChatCORE budgets to time: full, sft, or none")
    a("--chatcore-configs", default=None, help="configs to time ChatCORE for (default: all of --configs)")
    a("--max-tokens", type=int, default=512, help="new tokens per generative ChatCORE problem")
    a("--cat-batch", type=int, default=32)
    a("--gen-batch", type=int, default=128)
    a("--data-dir", type=Path, default=None, help="read the real eval tasks found here (needs --tokenizer)")
    a("--tokenizer", type=Path, default=None)
    a("--device", default="")
    a("--no-check", action="store_true", help="skip the decode-path correctness checks that run first")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # torch 2.11's set_device wants an index
        device = torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    elif not args.smoke:
        print("bench_generate: no CUDA device; pass --smoke for the tiny CPU run")
        return 1
    vocab, seq_len = 32768, 2048
    configs = {"d12": (12, 768), "d20": (20, None)}
    sizes = dict(TASKS)
    if args.smoke:
        vocab, seq_len = 1024, 256
        configs = {"d2": (2, 64)}
        args.configs, args.batches = "d2", "1,4"
        args.prompt_len, args.new_tokens, args.repeats, args.max_tokens = 20, 12, 1, 8
        args.cat_batch, args.gen_batch = 4, 4
        sizes = {name: (6 if kind == "categorical" else 3, min(median, 40), sigma, kind)
                 for name, (n, median, sigma, kind) in TASKS.items()}
    if args.tokenizer is not None:
        from pipeline.tokenizer import load_tokenizer
        tok = load_tokenizer(args.tokenizer)
        vocab = tok.vocab_size
    else:
        if args.data_dir is not None:
            print("bench_generate: --data-dir needs --tokenizer (the real tasks' text needs a real tokenizer)")
            return 2
        tok = synthetic_tokenizer(vocab)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in configs]
    if unknown:
        print(f"bench_generate: unknown config(s) {unknown}; known: {', '.join(configs)}")
        return 2
    budgets = [b for b in args.chatcore.split(",") if b and b != "none"]
    cc_names = args.chatcore_configs.split(",") if args.chatcore_configs else names
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": dev_name, "torch": torch.__version__, "smoke": args.smoke, "vocab": vocab,
              "sequence_len": seq_len, "baseline_tok_s": BASELINE_TOK_S, "targets": TARGETS, "configs": {}}
    print(f"# bench_generate on {dev_name}, torch {torch.__version__}{' (smoke)' if args.smoke else ''}", flush=True)
    if not args.no_check:
        checks = decode_checks(device)
        report["decode_checks"] = checks
        for k, v in checks.items():
            if k != "ok":
                print(f"check {k}: {'PASS' if v['ok'] else 'FAIL'} "
                      + " ".join(f"{m}={x:.4f}" for m, x in v.items() if m != "ok"), flush=True)
    tasks, source = load_tasks(args, tok, sizes) if budgets else ({}, {})
    report["chatcore_tasks"] = source
    vocab_hi = min(vocab, tok.bos_id)  # random prompts of ordinary tokens
    for name in names:
        depth, n_embd = configs[name]
        model = build(depth, n_embd, vocab, seq_len, device, never=(tok.bos_id, tok.special_id("<|assistant_end|>")))
        engine = Engine(model, tok)
        r: dict = {"params": sum(p.numel() for p in model.parameters()), "n_embd": model.config.n_embd}
        r["single"] = bench_single(engine, vocab_hi, args.prompt_len, args.new_tokens, device, args.repeats)
        print(f"{name}: single stream {r['single']['tok_s']:.1f} tok/s "
              f"(decode {r['single']['decode_tok_s']:.1f} tok/s, prefill {1000 * r['single']['prefill_s']:.1f} ms)",
              flush=True)
        r["batched"] = []
        for b in map(int, args.batches.split(",")):
            try:
                res = bench_batched(engine, vocab_hi, args.prompt_len, args.new_tokens, b, device)
            except torch.OutOfMemoryError:
                res = {"batch": b, "error": "out of memory"}
                torch.cuda.empty_cache()
            r["batched"].append(res)
            print(f"{name}: batch {b}: {res.get('tok_s', float('nan')):,.0f} tok/s", flush=True)
        r["nanochat"] = bench_nanochat(depth, n_embd, vocab, seq_len, args.prompt_len, args.new_tokens, tok, device) \
            if not args.smoke else {"error": "skipped in --smoke"}
        if "tok_s" in r["nanochat"]:
            print(f"{name}: nanochat Engine single stream {r['nanochat']['tok_s']:.1f} tok/s", flush=True)
        r["chatcore"] = {}
        if name in cc_names:
            for budget in budgets:
                res = bench_chatcore(model, tok, tasks, budget, args.max_tokens, args.cat_batch, args.gen_batch,
                                     device)
                r["chatcore"][budget] = res
                per = ", ".join(f"{t} {v['seconds']:.1f}s" for t, v in res["tasks"].items())
                print(f"{name}: ChatCORE {budget}: {res['seconds']:.1f}s ({per})", flush=True)
        if device.type == "cuda":
            r["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        report["configs"][name] = r
        del model, engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from trainer.engine import _GRAPHS_BROKEN
    report["cuda_graphs"] = (f"failed, eager steps: {_GRAPHS_BROKEN[0]}" if _GRAPHS_BROKEN else
                             "on" if device.type == "cuda" and os.environ.get("NANOSFT_CUDA_GRAPHS", "1") != "0"
                             else "off")
    print()
    print(table(report))
    print(f"CUDA graphs for decode steps: {report['cuda_graphs']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    if not args.no_check and not report["decode_checks"]["ok"]:
        print("bench_generate: a decode check FAILED (see 'check' lines above)")
        return 3
    return 0


def table(report: dict) -> str:
    lines = ["| config | single tok/s | vs baseline | " + " | ".join(
        f"batch {b['batch']} tok/s" for b in next(iter(report["configs"].values()))["batched"]) +
        " | ChatCORE full s | ChatCORE sft s |"]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for name, r in report["configs"].items():
        nano = r["nanochat"].get("tok_s") or report["baseline_tok_s"]
        cc = r["chatcore"]
        batched = " | ".join(f"{b['tok_s']:,.0f}" if "tok_s" in b else b.get("error", "-") for b in r["batched"])
        chatcore = " | ".join(f"{cc[k]['seconds']:.1f}" if k in cc else "-" for k in ("full", "sft"))
        lines.append(f"| {name} | {r['single']['tok_s']:,.1f} | {r['single']['tok_s'] / nano:.1f}x | {batched} | "
                     f"{chatcore} |")
    base = "nanochat's Engine, same run" if any("tok_s" in r["nanochat"] for r in report["configs"].values()) \
        else f"{report['baseline_tok_s']} tok/s (nanochat's Engine, issue 7)"
    lines.append(f"baseline: {base}; targets: single d12 >= {TARGETS['single_d12_tok_s']:.0f} tok/s, batched d20 >= "
                 f"{TARGETS['batched_d20_tok_s']:,.0f} tok/s, ChatCORE full d20 <= {TARGETS['chatcore_full_d20_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
