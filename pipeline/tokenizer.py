"""The nanochat tokenizer: a tiktoken Encoding with nine special tokens (reference §1).

nanochat stores its tokenizer as `pickle.dump(tiktoken.Encoding)`. A pickle can run any code when
loaded, so `load_tokenizer` never calls `pickle.load` on it: a restricted unpickler admits only the
one class that file contains, records its state, and we build the Encoding ourselves.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import struct
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tiktoken

from pipeline.errors import DataError, SourceMissingError

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

# GPT-4's cl100k pattern, except digits are grouped by at most 2 (nanochat's choice).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

_STATE_KEYS = ("name", "pat_str", "mergeable_ranks", "special_tokens")


class ChatTokenizer:
    """A tiktoken Encoding that carries nanochat's special tokens, with the few calls the pipeline needs."""

    def __init__(self, enc: tiktoken.Encoding):
        if not isinstance(enc, tiktoken.Encoding):
            raise TypeError(f"ChatTokenizer wraps a tiktoken.Encoding, got {type(enc).__name__}")
        specials = enc._special_tokens
        missing = [t for t in SPECIAL_TOKENS if t not in specials]
        if missing:
            raise DataError(f"tokenizer lacks special token(s) {', '.join(missing)}; "
                            f"a nanochat tokenizer has all of {', '.join(SPECIAL_TOKENS)}")
        self.enc = enc
        self._special_ids = {t: specials[t] for t in SPECIAL_TOKENS}
        self.bos_id: int = self._special_ids["<|bos|>"]
        self.vocab_size: int = enc.n_vocab

    def __repr__(self) -> str:
        return f"ChatTokenizer(name={self.enc.name!r}, vocab_size={self.vocab_size})"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of what decides the token stream (pattern, ranks, special tokens), not of a file's bytes:
        the same tokenizer gives the same fingerprint however it was built or pickled."""
        h = hashlib.sha256()
        pat = self.enc._pat_str.encode("utf-8")
        h.update(struct.pack("<Q", len(pat)) + pat)
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: (kv[1], kv[0]))
        h.update(struct.pack("<Q", len(ranks)))
        h.update(b"".join(struct.pack("<QQ", rank, len(b)) + b for b, rank in ranks))
        specials = sorted(self.enc._special_tokens.items(), key=lambda kv: (kv[1], kv[0]))
        h.update(struct.pack("<Q", len(specials)))
        for name, tid in specials:
            nb = name.encode("utf-8")
            h.update(struct.pack("<QQ", tid, len(nb)) + nb)
        return h.hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ordinary encoding: special-token strings inside `text` are plain bytes, as in nanochat."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=8)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def special_id(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"{name!r} is not one of the special tokens {SPECIAL_TOKENS}") from None

    def token_bytes(self) -> np.ndarray:
        """int32[vocab_size]: raw byte length of each token, 0 for special tokens (and unused ids).

        This is nanochat master's table (`decode_single_token_bytes` length, commit 2ce972a), not moe3's,
        which counted U+FFFD replacements for tokens that are not valid UTF-8 on their own."""
        table = np.zeros(self.vocab_size, dtype=np.int32)
        ranks = self.enc._mergeable_ranks
        ids = np.fromiter(ranks.values(), dtype=np.int64, count=len(ranks))
        lens = np.fromiter((len(b) for b in ranks), dtype=np.int32, count=len(ranks))
        table[ids] = lens
        table[list(self.enc._special_tokens.values())] = 0
        return table


# ---------------------------------------------------------------------------------------------
# loading and saving


class _EncodingState:
    """Inert stand-in for tiktoken.core.Encoding during unpickling: it only records the state."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(
            f"global {module}.{name} is not allowed; a tokenizer pickle may reference only "
            f"tiktoken.core.Encoding (pickled with protocol >= 3, as pickle.dump does by default)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a tokenizer pickle")


def _check_state(obj) -> dict:
    """The Encoding constructor arguments from an unpickled stand-in, with their types checked."""
    if not isinstance(obj, _EncodingState):
        raise DataError(f"expected a pickled tiktoken.core.Encoding, found {type(obj).__name__}")
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise DataError(f"the pickle names the registered tiktoken encoding {state!r} instead of holding "
                        f"its ranks; a nanochat tokenizer.pkl holds the full state")
    if not isinstance(state, dict):
        raise DataError(f"Encoding state should be a dict, found {type(state).__name__}")
    if sorted(state) != sorted(_STATE_KEYS):
        raise DataError(f"Encoding state should have keys {list(_STATE_KEYS)}, found {list(state)}")
    for key in ("name", "pat_str"):
        if not isinstance(state[key], str):
            raise DataError(f"Encoding {key} should be a str, found {type(state[key]).__name__}")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not isinstance(ranks, dict) or not isinstance(specials, dict):
        raise DataError("Encoding mergeable_ranks and special_tokens should be dicts")
    if not all(type(k) is bytes and type(v) is int and v >= 0 for k, v in ranks.items()):
        raise DataError("Encoding mergeable_ranks should map bytes to non-negative int")
    if not all(type(k) is str and type(v) is int and v >= 0 for k, v in specials.items()):
        raise DataError("Encoding special_tokens should map str to non-negative int")
    rank_ids = set(ranks.values())
    if len(rank_ids) != len(ranks):
        raise DataError("Encoding mergeable_ranks has duplicate ranks")
    clash = sorted(t for t, i in specials.items() if i in rank_ids)
    if clash or len(set(specials.values())) != len(specials):
        raise DataError(f"special token ids collide with ranks or each other: {clash or list(specials)}")
    return state


def load_tokenizer(path: str | Path) -> ChatTokenizer:
    """Load a nanochat `tokenizer.pkl` without running any code stored in it."""
    path = Path(path)
    if not path.is_file():
        raise SourceMissingError(
            "no tokenizer file here; expected a nanochat tokenizer.pkl (<base dir>/tokenizer/tokenizer.pkl) "
            "or one written by save_tokenizer", file=path.resolve())
    try:
        with open(path, "rb") as f:
            obj = _TokenizerUnpickler(f).load()
        state = _check_state(obj)
        enc = tiktoken.Encoding(**state)
        return ChatTokenizer(enc)
    except DataError as e:
        raise e.located(file=path) from None
    except Exception as e:  # anything the unpickler or tiktoken rejects: a bad file, not a bug here
        raise DataError(f"not a loadable tokenizer pickle: {type(e).__name__}: {e}", file=path) from None


def save_tokenizer(tok: ChatTokenizer, path: str | Path) -> None:
    """Write `pickle.dump(tok.enc)` (what nanochat reads) atomically: temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(tok.enc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> ChatTokenizer:
    """Train a BPE tokenizer with rustbpe as nanochat's tok_train does (reference §1.4).

    rustbpe learns `vocab_size - 9` ranks; the nine special tokens take the ids right after them.
    On a small corpus rustbpe may run out of pairs, and the vocab is then smaller than asked."""
    import rustbpe

    if vocab_size - len(SPECIAL_TOKENS) < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(b): int(r) for b, r in bpe.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(),
                            mergeable_ranks=ranks, special_tokens=specials)
    return ChatTokenizer(enc)
