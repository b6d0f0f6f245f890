"""Shared fixtures. `tiny_tokenizer` is a real rustbpe-trained ChatTokenizer, small enough to train per session."""
from __future__ import annotations

import pytest

from pipeline.tokenizer import ChatTokenizer, train_tokenizer

_PROSE = """\
The quick brown fox jumps over the lazy dog. It's a sunny day; we'll walk to the park, and they've said
they're coming too. I'd like 2 coffees and 13 croissants, please! How much is that? $17.50, or 1,234 yen.
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? 48/2 = 24, 48+24 = 72. #### 72
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.
Multiple Choice question: What is the capital of France?
- Paris=A
- London=B
- Berlin=C
- Madrid=D

Respond only with the letter of the correct answer.
Hello! I'm nanochat, a small language model. I was trained on 38 billion tokens for about $800.
def add(a, b):
    return a + b  # adds two numbers

for i in range(10):
    print(f"{i}: {i * i}")
{"role": "user", "content": "hi"} -> [1, 2, 3] ; x != y && z >= 4 || w <= 5 ... (ok) [done]
Ünïcödé tëxt: café, naïve, Zürich, São Paulo, Kraków, İstanbul, Ελληνικά, русский язык, 日本語の文章, 中文句子,
한국어 문장, العربية, עברית, हिन्दी, emoji 😀🎉🚀 and symbols ∑ ∫ √ π ≈ ≠ ∞ € £ ¥ © ® ™ — “quotes” ‘single’ …
Tabs\tand  double  spaces,\r\nwindows newlines, trailing spaces   
and a blank line:

UPPER CASE WORDS, MiXeD CaSe, snake_case, camelCase, kebab-case, dotted.name, e-mail: someone@example.com
https://github.com/karpathy/nanochat?tab=readme#setup 3.14159 2.71828 0.5 -42 1e-9 100% 99.9% 007 2024-05-17
"""


def _tiny_corpus() -> list[str]:
    # Repeat the prose with small numeric variations so pair counts build up and digits of all kinds occur.
    docs = [_PROSE]
    for i in range(12):
        docs.append(f"Document {i}: {i * 37 % 101} apples and {i * 91 % 997} pears cost ${i * 3}.{i:02d}. "
                    f"The answer is {i * 12345 % 99991}. Ça coûte {i} € — ok? 答案是{i * 7}。")
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer() -> ChatTokenizer:
    """A ChatTokenizer trained in-process with rustbpe (vocab ~512) on a few KB of varied text."""
    pytest.importorskip("rustbpe", reason="rustbpe is not installed (e.g. on the GPU image)")
    return train_tokenizer(_tiny_corpus(), vocab_size=512)
