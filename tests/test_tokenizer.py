"""pipeline.tokenizer: special tokens, safe loading, nanochat-compatible saving, fingerprint, token_bytes."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from pipeline.errors import DataError, SourceMissingError
from pipeline.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, ChatTokenizer, load_tokenizer, save_tokenizer,
                                train_tokenizer)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "docs" / "nanochat-reference.md"

SAMPLES = [
    "",
    "Hello world! It's 2024-05-17, and we'll pay $1,234.56.",
    "  leading spaces\n\ttabs\r\nand\n\n\nnewlines   ",
    "Ünïcödé café 日本語 😀🚀 ∑√π",
    "def f(x):\n    return x ** 2  # square",
    "12345678901234567890",
    "never seen: qzxjvk wwwww ŋŋŋ",
]


def _ranks_and_specials(tok: ChatTokenizer) -> tuple[dict[bytes, int], dict[str, int]]:
    ranks = {tok.enc.decode_single_token_bytes(i): i for i in range(tok.vocab_size) if i not in tok.enc._special_tokens.values()}
    return ranks, dict(tok.enc._special_tokens)


def _encoding(ranks, specials, name="rustbpe", pat=SPLIT_PATTERN) -> tiktoken.Encoding:
    return tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)


def _write_pickle(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


# --- constants -------------------------------------------------------------------------------

def test_special_tokens_order():
    assert len(SPECIAL_TOKENS) == 9
    assert SPECIAL_TOKENS[0] == "<|bos|>" and SPECIAL_TOKENS[4] == "<|assistant_end|>"
    assert SPECIAL_TOKENS[-1] == "<|output_end|>"


def test_split_pattern_matches_reference_text():
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present")
    text = REFERENCE.read_text()
    section = text[text.index("### 1.2"):text.index("### 1.3")]
    block = re.search(r"```\n(.*?)\n```", section, re.S).group(1)
    assert SPLIT_PATTERN == block


def test_split_pattern_groups_digits_by_two(tiny_tokenizer):
    # the pieces (not tokens) of a digit run are at most 2 long: no token can span 3 digits
    for i in tiny_tokenizer.encode("1234567 and 98765 and 3.14159"):
        piece = tiny_tokenizer.enc.decode_single_token_bytes(i)
        assert len(re.findall(rb"\d", piece)) <= 2


# --- training and ids ------------------------------------------------------------------------

def test_trained_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    ranks = tok.enc._mergeable_ranks
    m = len(ranks)
    assert 256 < m <= 512 - 9
    assert sorted(ranks.values()) == list(range(m))
    # ranks 0..255 are the single bytes in byte order
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert [tok.special_id(t) for t in SPECIAL_TOKENS] == list(range(m, m + 9))
    assert tok.bos_id == m
    assert tok.vocab_size == m + 9 == tok.enc.n_vocab
    assert tok.enc.name == "rustbpe"


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="at least 265"):
        train_tokenizer(["abc"], 264)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_text(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_encode_batch_matches_encode(tiny_tokenizer):
    assert tiny_tokenizer.encode_batch(SAMPLES) == [tiny_tokenizer.encode(t) for t in SAMPLES]
    assert tiny_tokenizer.encode_batch(iter(SAMPLES[:2])) == [tiny_tokenizer.encode(t) for t in SAMPLES[:2]]


def test_special_strings_in_text_are_plain_bytes(tiny_tokenizer):
    tok = tiny_tokenizer
    specials = set(tok.enc._special_tokens.values())
    text = "say <|bos|> then <|assistant_end|><|python_start|>1+1<|python_end|>"
    ids = tok.encode(text)
    assert not specials & set(ids)
    assert tok.decode(ids) == text
    assert len(tok.encode("<|bos|>")) > 1


def test_special_id_unknown_name(tiny_tokenizer):
    with pytest.raises(KeyError, match="<|nope|>"):
        tiny_tokenizer.special_id("<|nope|>")


def test_wrapping_requires_all_special_tokens(tiny_tokenizer):
    ranks, specials = _ranks_and_specials(tiny_tokenizer)
    del specials["<|python_end|>"], specials["<|user_end|>"]
    with pytest.raises(DataError) as e:
        ChatTokenizer(_encoding(ranks, specials))
    assert "<|python_end|>" in str(e.value) and "<|user_end|>" in str(e.value)
    with pytest.raises(TypeError):
        ChatTokenizer({"not": "an encoding"})


# --- token_bytes -----------------------------------------------------------------------------

def test_token_bytes(tiny_tokenizer):
    tok = tiny_tokenizer
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (tok.vocab_size,)
    special_ids = {tok.special_id(t) for t in SPECIAL_TOKENS}
    for i in range(tok.vocab_size):
        if i in special_ids:
            assert tb[i] == 0
        else:
            assert tb[i] == len(tok.enc.decode_single_token_bytes(i))
    # master's raw-byte table: a lone continuation byte counts 1, not 3 (moe3's U+FFFD count)
    assert tb[0x80] == 1
    # a multi-byte merged token exists and is counted in bytes, not characters
    assert tb.max() > 1


# --- fingerprint -----------------------------------------------------------------------------

def test_fingerprint_is_deterministic_and_cached(tiny_tokenizer):
    ranks, specials = _ranks_and_specials(tiny_tokenizer)
    # same content, different insertion order and name: same fingerprint
    rebuilt = ChatTokenizer(_encoding(dict(reversed(list(ranks.items()))), specials, name="other"))
    assert rebuilt.fingerprint == tiny_tokenizer.fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", rebuilt.fingerprint)
    assert tiny_tokenizer.fingerprint is tiny_tokenizer.fingerprint  # computed once


def test_fingerprint_changes_with_ranks_pattern_specials(tiny_tokenizer):
    base = tiny_tokenizer.fingerprint
    ranks, specials = _ranks_and_specials(tiny_tokenizer)
    merged = sorted((r, b) for b, r in ranks.items() if r >= 256)
    (r1, b1), (r2, b2) = merged[-1], merged[-2]
    swapped = dict(ranks)
    swapped[b1], swapped[b2] = r2, r1
    assert ChatTokenizer(_encoding(swapped, specials)).fingerprint != base
    assert ChatTokenizer(_encoding(ranks, specials, pat=SPLIT_PATTERN.replace("{1,2}", "{1,3}"))).fingerprint != base
    moved = dict(specials)
    moved["<|bos|>"], moved["<|user_start|>"] = specials["<|user_start|>"], specials["<|bos|>"]
    assert ChatTokenizer(_encoding(ranks, moved)).fingerprint != base


# --- save / load -----------------------------------------------------------------------------

def test_save_load_round_trip(tiny_tokenizer, tmp_path):
    path = tmp_path / "tokenizer" / "tokenizer.pkl"
    save_tokenizer(tiny_tokenizer, path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.pkl"]  # no temp file left behind
    loaded = load_tokenizer(path)
    assert loaded.fingerprint == tiny_tokenizer.fingerprint
    assert loaded.vocab_size == tiny_tokenizer.vocab_size and loaded.bos_id == tiny_tokenizer.bos_id
    assert loaded.enc.name == "rustbpe"
    for text in SAMPLES:
        assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert np.array_equal(loaded.token_bytes(), tiny_tokenizer.token_bytes())
    # what nanochat does: a plain pickle.load gives a working tiktoken Encoding
    with open(path, "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.encode_ordinary(SAMPLES[1]) == tiny_tokenizer.encode(SAMPLES[1])
    assert enc.encode_single_token("<|assistant_end|>") == tiny_tokenizer.special_id("<|assistant_end|>")
    # overwriting an existing file works (atomic replace)
    save_tokenizer(loaded, path)
    assert load_tokenizer(path).fingerprint == tiny_tokenizer.fingerprint


def test_load_plain_nanochat_style_pickle(tiny_tokenizer, tmp_path):
    # written the way nanochat's tok_train writes it: pickle.dump with the default protocol
    path = tmp_path / "tokenizer.pkl"
    with open(path, "wb") as f:
        pickle.dump(tiny_tokenizer.enc, f)
    assert load_tokenizer(str(path)).fingerprint == tiny_tokenizer.fingerprint


def test_load_missing_file_names_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.pkl"
    with pytest.raises(SourceMissingError) as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value)


class _RunsCommand:
    """Pickles to a call of os.system; loading it with plain pickle would run the command."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    sentinel = tmp_path / "pwned"
    path = _write_pickle(tmp_path / "tokenizer.pkl", _RunsCommand(f"touch {sentinel}"))
    with pytest.raises(DataError) as e:
        load_tokenizer(path)
    assert not sentinel.exists()
    assert "system" in str(e.value) and str(path) in str(e.value)


def test_malicious_object_inside_encoding_state_is_refused(tiny_tokenizer, tmp_path):
    sentinel = tmp_path / "pwned"
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN,
                            mergeable_ranks=dict(tiny_tokenizer.enc._mergeable_ranks),
                            special_tokens=dict(tiny_tokenizer.enc._special_tokens))
    state = enc.__getstate__()
    state["special_tokens"] = dict(state["special_tokens"], evil=_RunsCommand(f"touch {sentinel}"))
    enc.__getstate__ = lambda: state  # instance attribute shadows the method for this one pickling
    data = pickle.dumps(enc)
    assert b"tiktoken.core" in data and b"system" in data
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(data)
    with pytest.raises(DataError):
        load_tokenizer(path)
    assert not sentinel.exists()


def test_pickle_missing_special_token_is_refused(tiny_tokenizer, tmp_path):
    ranks, specials = _ranks_and_specials(tiny_tokenizer)
    del specials["<|output_end|>"]
    path = _write_pickle(tmp_path / "tokenizer.pkl", _encoding(ranks, specials))
    with pytest.raises(DataError) as e:
        load_tokenizer(path)
    assert "<|output_end|>" in str(e.value) and e.value.file == str(path)


@pytest.mark.parametrize("obj, words", [
    ({"name": "x"}, "tiktoken.core.Encoding"),
    ([1, 2, 3], "list"),
])
def test_pickle_of_wrong_object_is_refused(tmp_path, obj, words):
    path = _write_pickle(tmp_path / "tokenizer.pkl", obj)
    with pytest.raises(DataError, match=re.escape(words)):
        load_tokenizer(path)


def test_bad_encoding_state_is_refused(tiny_tokenizer, tmp_path):
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN,
                            mergeable_ranks=dict(tiny_tokenizer.enc._mergeable_ranks),
                            special_tokens=dict(tiny_tokenizer.enc._special_tokens))
    good = enc.__getstate__()
    cases = [
        (dict(good, mergeable_ranks={"a": 0}), "mergeable_ranks"),
        (dict(good, special_tokens={**good["special_tokens"], "<|bos|>": "0"}), "special_tokens"),
        (dict(good, pat_str=None), "pat_str"),
        ({k: v for k, v in good.items() if k != "name"}, "keys"),
        (dict(good, special_tokens={**good["special_tokens"], "<|bos|>": 0}), "collide"),
        ("cl100k_base", "registered"),
    ]
    for state, words in cases:
        enc.__getstate__ = lambda state=state: state
        path = _write_pickle(tmp_path / "tokenizer.pkl", enc)
        with pytest.raises(DataError, match=words):
            load_tokenizer(path)


def test_garbage_and_old_protocol_files_are_refused(tiny_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(b"definitely not a pickle")
    with pytest.raises(DataError):
        load_tokenizer(path)
    path.write_bytes(pickle.dumps(tiny_tokenizer.enc)[:100])  # truncated
    with pytest.raises(DataError):
        load_tokenizer(path)
    # protocol 2 stores bytes through _codecs.encode, which the restricted loader does not admit
    path.write_bytes(pickle.dumps(tiny_tokenizer.enc, protocol=2))
    with pytest.raises(DataError, match="_codecs.encode"):
        load_tokenizer(path)
