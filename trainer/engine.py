"""Generation with nanochat's calculator tool (reference §9.3).

`Engine.generate` prefills the prompt into the model's KV cache (`model.new_kv_cache`) and then feeds
one token per step. A model without a cache (e.g. a stand-in in tests) gets the plain fallback: the full
forward over the context, cropped from the left to `model.config.sequence_len`, at every step.

Tool use follows nanochat: the tokens between `<|python_start|>` and `<|python_end|>` are decoded and
handed to `calculator`; when it returns a value, `<|output_start|>`, the value's tokens and
`<|output_end|>` are forced, one per step, in place of what the model would have sampled. Forced tokens
count toward `max_tokens`, as in nanochat.
"""
from __future__ import annotations

import signal
import string
import threading
import warnings
from contextlib import contextmanager
from typing import Any

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


class Engine:
    """Greedy / top-k generation for one prompt, with the calculator tool (KV cache when the model has one)."""

    def __init__(self, model, tok):
        self.model = model
        self.tok = tok
        sid = tok.special_id
        self.bos = tok.bos_id
        self.assistant_end = sid("<|assistant_end|>")
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_tokens: int = 512, temperature: float = 0.0,
                 top_k: int | None = 50, seed: int = 42) -> list[int]:
        """The completion's tokens (forced tool output included), without the terminal
        `<|assistant_end|>` / `<|bos|>`. Stops at a terminal token or after `max_tokens` steps."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; a prompt starts with <|bos|> at least")
        device = next(self.model.parameters()).device
        context = int(self.model.config.sequence_len)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        ids = list(prompt_ids)
        out: list[int] = []
        forced: list[int] = []
        in_python, expr_tokens = False, []
        cache = None
        if hasattr(self.model, "new_kv_cache"):
            limit = self.model.cos.size(1)  # rotary positions available
            ids = ids[-max(1, limit - max_tokens):]
            cache = self.model.new_kv_cache(1, len(ids) + max_tokens)
            logits = self.model(torch.tensor([ids], dtype=torch.long, device=device), kv_cache=cache)[0, -1]
        for step in range(max_tokens):
            if forced:  # the model's sample is discarded
                token = forced.pop(0)
            else:
                if cache is None:
                    x = torch.tensor([ids[-context:]], dtype=torch.long, device=device)
                    logits = self.model(x)[0, -1]
                token = sample_next(logits.float(), temperature, top_k, generator)
            if token == self.assistant_end or token == self.bos:
                break
            ids.append(token)
            out.append(token)
            if cache is not None and step + 1 < max_tokens:  # extend the cache with the chosen token
                logits = self.model(torch.tensor([[token]], dtype=torch.long, device=device), kv_cache=cache)[0, -1]
            if token == self.python_start:
                in_python, expr_tokens = True, []
            elif token == self.python_end and in_python:
                in_python = False
                value = calculator(self.tok.decode(expr_tokens)) if expr_tokens else None
                if value is not None:
                    forced += [self.output_start, *self.tok.encode(str(value)), self.output_end]
                expr_tokens = []
            elif in_python:
                expr_tokens.append(token)
        return out
