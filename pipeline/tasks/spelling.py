"""SimpleSpelling and SpellingBee: synthetic spelling / letter-counting conversations (reference §3.10-3.12).

Every example is a pure function of (word list, split, physical index) through `random.Random(seed)`, so
they are byte-identical to nanochat's given the same word list. nanochat downloads dwyl's
`words_alpha.txt`; point `words` at that file to reproduce its data exactly. Without `words` the list
comes offline from the `english-words` package: its `web2` list with options alpha+lower (234,450 words,
all a-z), sorted, because the package returns an unordered set.
"""
from __future__ import annotations

import functools
import importlib.resources
import random
from pathlib import Path
from typing import Any

from pipeline.errors import DataError, SourceMissingError
from pipeline.tasks.base import Task
from pipeline.tasks.source import fetch_command, read_lines

PARAMS = {"size": ("int", 1000), "split": ("str", "train"), "words": ("str?", None)}

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEST_RANDOM_SEED_OFFSET = 10_000_000
QUOTES = ["", "'", '"']

USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}", "How many {letter} are in {word}",
    "Count the number of {letter} in {word}", "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}", "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}", "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}", "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}", "Count all the {letter} in {word}",
    "How many times is {letter} in {word}", "Number of {letter} in {word}",
    "Total count of {letter} in {word}", "How many {letter} does {word} have",
    "How many {letter} does {word} contain", "What's the number of {letter} in {word}",
    "{word} has how many {letter}", "In {word}, count the {letter}",
    "How many {letter} appear in {word}", "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}", "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}", "Calculate the number of {letter} in {word}",
    # Spanish
    "¿Cuántas {letter} hay en {word}?", "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}", "¿Cuántas letras {letter} tiene {word}?",
    # Chinese
    "{word}中有多少个{letter}", "{word}里有几个{letter}", "数一下{word}中的{letter}", "{word}这个词里有多少{letter}",
    # Korean
    "{word}에 {letter}가 몇 개 있나요", "{word}에서 {letter}의 개수는", "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    # French
    "Combien de {letter} dans {word}", "Combien de fois {letter} apparaît dans {word}", "Compte les {letter} dans {word}",
    # German
    "Wie viele {letter} sind in {word}", "Wie oft kommt {letter} in {word} vor", "Zähle die {letter} in {word}",
    # Japanese
    "{word}に{letter}は何個ありますか", "{word}の中に{letter}がいくつ", "{word}に{letter}が何回出てくる",
]
assert len(USER_MSG_TEMPLATES) == 51

DEFAULT_WORDS_NAME = "english-words:web2_alpha_lower (sorted)"


@functools.lru_cache(maxsize=1)
def default_words() -> tuple[str, ...]:
    """The offline default word list: english-words' web2 (alpha, lower), sorted for a fixed order."""
    from english_words import get_english_words_set
    words = sorted(w for w in get_english_words_set(["web2"], alpha=True, lower=True)
                   if w and w.isascii() and w.isalpha() and w.islower())
    return tuple(words)


def default_words_file() -> Path:
    """The package data file behind the default list (hashed into the manifest)."""
    return Path(str(importlib.resources.files("english_words").joinpath("data", "web2_alpha_lower.pickle")))


def load_words(data_dir: Path, words: str | None) -> tuple[list[str], Path | None]:
    """(words, file): a recipe's word file (one word per line, stripped, file order) or the default list."""
    if words is None:
        return list(default_words()), None
    path = Path(words) if Path(words).is_absolute() else Path(data_dir) / words
    if not path.is_file():
        hint = f"; to download it: {fetch_command(data_dir)}" if words == "words_alpha.txt" else ""
        raise SourceMissingError(f"word list {path} does not exist (nanochat's list: https://raw.githubusercontent"
                                 f".com/dwyl/english-words/refs/heads/master/words_alpha.txt){hint}", file=path)
    lines = read_lines(path)
    for k, w in enumerate(lines):
        if not w:
            raise DataError("blank line in the word list", file=path, row=k + 1)
    if not lines:
        raise DataError("the word list is empty", file=path)
    return lines, path


def example_seed(split: str, p: int) -> int:
    return p if split == "train" else TEST_RANDOM_SEED_OFFSET + p


class _SpellingTask(Task):
    def __init__(self, name: str, data_dir: Path, size: int, split: str, words: str | None):
        super().__init__(name)
        self.size, self.split = size, split
        self.words, self.words_file = load_words(data_dir, words)
        self.lines = list(range(len(self.words)))  # position of each word in the source list

    def num_examples(self) -> int:
        return self.size

    def locate_example(self, p: int) -> tuple[str, int]:
        """The word list and the chosen word's line (1-based; 0-based position in the default list)."""
        k = self.lines[random.Random(example_seed(self.split, p)).choice(range(len(self.words)))]
        return (str(self.words_file), k + 1) if self.words_file else (DEFAULT_WORDS_NAME, k)

    def inputs(self) -> list[Path]:
        return [self.words_file if self.words_file else default_words_file()]


class SimpleSpelling(_SpellingTask):
    """'Spell the word: apple' -> 'apple:a,p,p,l,e', words drawn from the list shuffled by Random(42)."""

    def __init__(self, name: str, data_dir: Path, size: int, split: str, words: str | None):
        super().__init__(name, data_dir, size, split, words)
        # Shuffling positions permutes exactly as shuffling the words (swaps depend only on the length)
        random.Random(42).shuffle(self.lines)
        self.words = [self.words[k] for k in self.lines]

    def get_example(self, p: int) -> dict[str, Any]:
        word = random.Random(example_seed(self.split, p)).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}


class SpellingBee(_SpellingTask):
    """'How many r in strawberry?' answered by spelling, counting, then checking with a python call."""

    def get_example(self, p: int) -> dict[str, Any]:
        rng = random.Random(example_seed(self.split, p))
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        lq, wq = rng.choice(QUOTES), rng.choice(QUOTES)
        user = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5:
            user += "?"
        manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach "
                  f"first.\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of "
                  f"'{letter}':\n")
        running = 0
        for pos, char in enumerate(word, 1):
            if char == letter:
                running += 1
                manual += f"{pos}:{char} hit! count={running}\n"
            else:
                manual += f"{pos}:{char}\n"
        manual += f"\nThis gives us {running}."
        return {"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [
                {"type": "text", "text": manual},
                {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
                {"type": "python", "text": f"'{word}'.count('{letter}')"},
                {"type": "python_output", "text": str(count)},
                {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
            ]},
        ]}
