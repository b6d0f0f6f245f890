"""Generation with nanochat's calculator tool (reference §9.3).

`Engine.generate_batch` prefills the prompts, left-padded to one length, into the model's KV cache
(`model.new_kv_cache`, per-row positions) and then feeds one token per row per step; each row stops on its
own (finished rows ride along until the batch is done). A model without a cache (e.g. a stand-in in tests)
gets the plain fallback, one row at a time: the full forward over the context, cropped from the left to
`model.config.sequence_len`, at every step.

Tool use follows nanochat: the tokens between `<|python_start|>` and `<|python_end|>` are decoded and
handed to `calculator`; when it returns a value, `<|output_start|>`, the value's tokens and
`<|output_end|>` are forced, one per step, in place of what the model would have sampled. Forced tokens
count toward `max_tokens`, as in nanochat. Tool state and forced tokens are per row.
"""
from __future__ import annotations

import os
import signal
import string
import threading
import warnings
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
STRING_CHARS = frozenset(string.ascii_letters + string.digits + "'\"()._ ")
FORBIDDEN = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
             "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
CALC_TIMEOUT_S = 3


class _CalcTimeout(Exception):
    pass


@contextmanager
def _alarm(seconds: int):
    """SIGALRM after `seconds`, restoring the previous handler. Signals can only be set from the main
    thread (and not on Windows); elsewhere the expression runs without a time limit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise _CalcTimeout(f"calculator expression ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _eval(expr: str) -> Any:
    try:
        with _alarm(CALC_TIMEOUT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # e.g. "5 (3)" warns "int is not callable"
            return eval(expr, {"__builtins__": {}}, {})
    except Exception:  # any failure (syntax, zero division, timeout, ...) means: no tool output
        return None


def calculator(expr: str) -> Any:
    """nanochat's tool: plain arithmetic, or a `.count(` on string literals; None when refused or failing.

    Commas are removed first (GSM8K writes 1,000). Arithmetic may not use `**` (huge powers hang).
    Anything else must use only letters, digits, quotes, `()._` and spaces, contain `.count(`, and
    none of the forbidden names (checked case-insensitively as substrings, so `'direction'` is refused
    too, as in nanochat)."""
    expr = expr.replace(",", "")
    if all(c in ARITHMETIC_CHARS for c in expr):
        return None if "**" in expr else _eval(expr)
    if not all(c in STRING_CHARS for c in expr):
        return None
    lowered = expr.lower()
    if any(name in lowered for name in FORBIDDEN):
        return None
    if ".count(" not in expr:
        return None
    return _eval(expr)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> int:
    """One token from a (V,) logit vector: argmax at temperature 0, else top-k then softmax sampling."""
    if temperature == 0.0:
        return int(logits.argmax())
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k > 0:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)))
        probs = F.softmax(vals / temperature, dim=-1)
        return int(idx[torch.multinomial(probs, 1, generator=generator)])
    probs = F.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Row:
    """One prompt's state during generation: its tool call in progress and the tokens to force."""

    def __init__(self, engine: "Engine", max_tokens: int):
        self.engine, self.left = engine, max_tokens
        self.forced: deque[int] = deque()
        self.in_python, self.expr = False, []
        self.done = max_tokens <= 0

    def take(self, sampled: int) -> int | None:
        """The token this row emits at this step (a forced one replaces the sample), or None when it stops."""
        e = self.engine
        token = self.forced.popleft() if self.forced else sampled
        self.left -= 1
        if token == e.assistant_end or token == e.bos:
            self.done = True
            return None
        self.done = self.left <= 0
        if token == e.python_start:
            self.in_python, self.expr = True, []
        elif token == e.python_end and self.in_python:
            self.in_python = False
            value = calculator(e.tok.decode(self.expr)) if self.expr else None
            if value is not None:
                self.forced += [e.output_start, *e.tok.encode(str(value)), e.output_end]
            self.expr = []
        elif self.in_python:
            self.expr.append(token)
        return token


_GRAPHS_BROKEN: list[str] = []  # the reason, once a capture has failed in this process (then: eager steps)


def graphs_wanted(model, device: torch.device) -> bool:
    """CUDA graphs for decode steps: on CUDA, dense models (MoE routing syncs with the host), unless
    NANOSFT_CUDA_GRAPHS=0 or a capture already failed here."""
    return (device.type == "cuda" and os.environ.get("NANOSFT_CUDA_GRAPHS", "1") != "0" and not _GRAPHS_BROKEN
            and hasattr(model, "moe_layers") and not model.moe_layers())


class _GraphedStep:
    """Decode steps of one static cache: the first runs eagerly (warming up kernels and workspaces on a side
    stream), the second is captured as a CUDA graph, and every later one replays it: one launch per step
    instead of hundreds. Falls back to eager static steps if the capture fails."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.tok = torch.zeros(cache.k[0].size(0), 1, dtype=torch.long, device=cache.k[0].device)
        self.graph, self.out, self.calls = None, None, 0
        self.stream = torch.cuda.Stream(device=self.tok.device)  # warm-up and capture on the same stream

    def _eager(self) -> torch.Tensor:
        return self.model(self.tok, kv_cache=self.cache)[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(tokens, non_blocking=True)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            self.cache.pos += 1  # the graph advanced pos_t on the device
            return self.out
        if self.calls == 1 or _GRAPHS_BROKEN:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self._eager()
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        pos = self.cache.pos
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                out = self._eager()
        except Exception as e:  # an op that cannot be captured: keep decoding without graphs
            _GRAPHS_BROKEN.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"CUDA graph capture failed, decoding without graphs: {_GRAPHS_BROKEN[0]}")
            self.cache.pos = pos
            self.cache._masks.clear()
            torch.cuda.synchronize()
            return self._eager()  # the step that was not run (pos_t was not advanced: capture runs nothing)
        self.cache.pos = pos  # capture ran the Python (advancing pos) but no kernel
        self.cache._masks.clear()
        self.graph, self.out = graph, out
        return self(tokens)


class Engine:
    """Greedy / top-k generation with the calculator tool, for one prompt or many decoded together (KV cache when
    the model has one; rows of different lengths are left-padded into one cache)."""

    def __init__(self, model, tok, cuda_graphs: bool | None = None):
        """cuda_graphs: None = on CUDA for dense models (see `graphs_wanted`); True on the CPU runs the same
        static steps without a graph (for tests); False = plain cached steps."""
        self.model = model
        self.tok = tok
        self.cuda_graphs = cuda_graphs
        self._kept = None  # ((batch, slots), cache, step): the last static cache, reused by a call of that shape
        sid = tok.special_id
        self.bos = tok.bos_id
        self.assistant_end = sid("<|assistant_end|>")
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")

    def generate(self, prompt_ids: list[int], max_tokens: int = 512, temperature: float = 0.0,
                 top_k: int | None = 50, seed: int = 42) -> list[int]:
        """The completion's tokens (forced tool output included), without the terminal
        `<|assistant_end|>` / `<|bos|>`. Stops at a terminal token or after `max_tokens` steps."""
        return self.generate_batch([prompt_ids], max_tokens, temperature, top_k, [seed])[0]

    def generate_batch(self, prompts: Sequence[list[int]], max_tokens: int = 512, temperature: float = 0.0,
                       top_k: int | None = 50, seeds: Sequence[int] | None = None) -> list[list[int]]:
        """`generate` for each prompt, decoded together; row b samples with its own seed (default 42 + b), so
        a row's result does not depend on the batch it is in."""
        outs: list[list[int]] = [[] for _ in prompts]
        for b, token in self.stream_batch(prompts, max_tokens, temperature, top_k, seeds):
            outs[b].append(token)
        return outs

    def stream(self, prompt_ids: list[int], max_tokens: int = 512, temperature: float = 0.0,
               top_k: int | None = 50, seed: int = 42) -> Iterator[int]:
        """The tokens of `generate`, one at a time as they are chosen (for a chat)."""
        for _, token in self.stream_batch([prompt_ids], max_tokens, temperature, top_k, [seed]):
            yield token

    @torch.no_grad()
    def stream_batch(self, prompts: Sequence[list[int]], max_tokens: int = 512, temperature: float = 0.0,
                     top_k: int | None = 50, seeds: Sequence[int] | None = None) -> Iterator[tuple[int, int]]:
        """(row, token) as each step chooses them; every row stops on its own."""
        if not prompts:
            return
        if any(not p for p in prompts):
            raise ValueError("a prompt is empty; a prompt starts with <|bos|> at least")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        seeds = list(seeds) if seeds is not None else [42 + b for b in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if not hasattr(self.model, "new_kv_cache"):  # a model without a cache: one row at a time
            for b, prompt in enumerate(prompts):
                for token in self._stream_uncached(prompt, max_tokens, temperature, top_k, seeds[b]):
                    yield b, token
            return
        device = next(self.model.parameters()).device
        generators = None
        if temperature > 0:
            generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        limit = self.model.cos.size(1)  # rotary positions available
        rows_ids = [list(p)[-max(1, limit - max_tokens):] for p in prompts]
        N = max(len(p) for p in rows_ids)
        graphed = self.cuda_graphs if self.cuda_graphs is not None else graphs_wanted(self.model, device)
        slots = N + max_tokens
        if graphed:  # whole-buffer attention: a round length keeps the mask aligned for the kernels
            slots = min(limit, -(-slots // 64) * 64)
        cache, step_fn = None, None
        if graphed and self._kept is not None and self._kept[0] == (len(rows_ids), slots):
            cache, step_fn = self._kept[1], self._kept[2]  # the same shapes as the last call: replay its graph
            cache.reset()
        self._kept = None  # at most one cache (and graph) is kept, the last one
        if cache is None:
            cache = self.model.new_kv_cache(len(rows_ids), slots)
        cache.set_padding([N - len(p) for p in rows_ids])
        x = torch.tensor([[self.bos] * (N - len(p)) + p for p in rows_ids], dtype=torch.long, device=device)
        logits = self.model(x, kv_cache=cache, last_only=True)[:, -1]
        if graphed and max_tokens > 1:
            cache.make_static()
            if step_fn is None:
                step_fn = _GraphedStep(self.model, cache) if device.type == "cuda" else \
                    (lambda t: self.model(t, kv_cache=cache)[:, -1])
            self._kept = ((len(rows_ids), slots), cache, step_fn)
        rows = [_Row(self, max_tokens) for _ in rows_ids]
        feed = [p[-1] for p in rows_ids]
        for step in range(max_tokens):
            live = [b for b, r in enumerate(rows) if not r.done]
            if not live:
                return
            if generators is None:
                sampled = logits.argmax(dim=-1).tolist()
            else:
                sampled = [0] * len(rows)
                for b in live:
                    if not rows[b].forced:
                        sampled[b] = sample_next(logits[b].float(), temperature, top_k, generators[b])
            for b in live:
                token = rows[b].take(sampled[b])
                if token is not None:
                    feed[b] = token
                    yield b, token
            if step + 1 < max_tokens and any(not r.done for r in rows):  # extend the cache with the chosen tokens
                if step_fn is not None:
                    logits = step_fn(torch.tensor(feed, dtype=torch.long)[:, None])
                else:
                    x = torch.tensor(feed, dtype=torch.long, device=device)[:, None]
                    logits = self.model(x, kv_cache=cache)[:, -1]

    def _stream_uncached(self, prompt: list[int], max_tokens: int, temperature: float, top_k: int | None,
                         seed: int) -> Iterator[int]:
        """The full forward over the context, cropped from the left to `sequence_len`, at every step."""
        device = next(self.model.parameters()).device
        context = int(self.model.config.sequence_len)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=device).manual_seed(seed)
        ids, row = list(prompt), _Row(self, max_tokens)
        while not row.done:
            sampled = 0
            if not row.forced:  # the model's sample would be discarded
                logits = self.model(torch.tensor([ids[-context:]], dtype=torch.long, device=device))[0, -1]
                sampled = sample_next(logits.float(), temperature, top_k, generator)
            token = row.take(sampled)
            if token is None:
                return
            ids.append(token)
            yield token
