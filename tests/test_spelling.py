"""SimpleSpelling / SpellingBee against an independent transcription of reference §3.9-3.12.

The transcription draws from a pure-Python MT19937 written from §3.9 (not CPython's `random`), so
agreement shows the tasks are byte-identical to nanochat's for the same word list.
"""
from __future__ import annotations


import pytest

from pipeline.errors import DataError, RecipeError, SourceMissingError
from pipeline.recipe import TaskSpec
from pipeline.tasks import build_task


# ---------------------------------------------------------------- §3.9: MT19937 as CPython seeds and uses it
class SpecRandom:
    N, M, MASK = 624, 397, 0xFFFFFFFF

    def __init__(self, seed: int):
        assert 0 <= seed < 2**32
        mt = [0] * self.N
        mt[0] = 19650218
        for i in range(1, self.N):
            mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & self.MASK
        key, i, j = [seed], 1, 0
        for _ in range(max(self.N, len(key))):
            mt[i] = ((mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525)) + key[j] + j) & self.MASK
            i, j = i + 1, j + 1
            if i >= self.N:
                mt[0], i = mt[self.N - 1], 1
            if j >= len(key):
                j = 0
        for _ in range(self.N - 1):
            mt[i] = ((mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941)) - i) & self.MASK
            i += 1
            if i >= self.N:
                mt[0], i = mt[self.N - 1], 1
        mt[0] = 0x80000000
        self.mt, self.index = mt, self.N

    def next32(self) -> int:
        if self.index >= self.N:
            mt = self.mt
            for k in range(self.N):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % self.N] & 0x7FFFFFFF)
                mt[k] = mt[(k + self.M) % self.N] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.index = 0
        y = self.mt[self.index]
        self.index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    def randbelow(self, n: int) -> int:
        k = n.bit_length()
        while True:
            r = self.next32() >> (32 - k)
            if r < n:
                return r

    def choice(self, seq):
        return seq[self.randbelow(len(seq))]

    def random(self) -> float:
        a, b = self.next32() >> 5, self.next32() >> 6
        return (a * 67108864 + b) / 2**53

    def shuffle(self, x: list) -> None:
        for i in range(len(x) - 1, 0, -1):
            j = self.randbelow(i + 1)
            x[i], x[j] = x[j], x[i]


def test_spec_rng_matches_cpython():
    import random
    for seed in (0, 1, 42, 10_000_000, 2**32 - 1):
        ours, theirs = SpecRandom(seed), random.Random(seed)
        assert [ours.next32() for _ in range(700)] == [theirs.getrandbits(32) for _ in range(700)]
        ours, theirs = SpecRandom(seed), random.Random(seed)
        assert [ours.random() for _ in range(5)] == [theirs.random() for _ in range(5)]


# ---------------------------------------------------------------- §3.10-3.12 written from the spec text
TEMPLATES = [
    "How many {letter} are in the word {word}", "How many {letter} are in {word}", "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}", "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}", "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}", "Find the count of {letter} in {word}", "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}", "How many {letter}s are in {word}", "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}", "How many times is {letter} in {word}", "Number of {letter} in {word}",
    "Total count of {letter} in {word}", "How many {letter} does {word} have", "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}", "{word} has how many {letter}", "In {word}, count the {letter}",
    "How many {letter} appear in {word}", "Count the {letter} in {word}", "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}", "Show me how many {letter} are in {word}", "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?", "¿Cuántas veces aparece {letter} en {word}?", "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?", "{word}中有多少个{letter}", "{word}里有几个{letter}",
    "数一下{word}中的{letter}", "{word}这个词里有多少{letter}", "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는", "{word}에 {letter}가 몇 번 나오나요", "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}", "Combien de fois {letter} apparaît dans {word}", "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}", "Wie oft kommt {letter} in {word} vor", "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか", "{word}の中に{letter}がいくつ", "{word}に{letter}が何回出てくる",
]


def seed_of(split, index):
    return index if split == "train" else 10_000_000 + index


def spec_simple(words, split, index):
    rng = SpecRandom(seed_of(split, index))
    word = rng.choice(words)
    return {"messages": [{"role": "user", "content": "Spell the word: " + word},
                         {"role": "assistant", "content": word + ":" + ",".join(list(word))}]}


def spec_bee(words, split, index):
    rng = SpecRandom(seed_of(split, index))
    word = rng.choice(words)
    u = rng.random()
    letter = rng.choice(word) if u < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    template = rng.choice(TEMPLATES)
    if rng.random() < 0.3:
        template = template.lower()
    lq = rng.choice(["", "'", '"'])
    wq = rng.choice(["", "'", '"'])
    user = template.format(letter=lq + letter + lq, word=wq + word + wq)
    if rng.random() < 0.5:
        user = user + "?"
    count = word.count(letter)
    text = ("We are asked to find the number '" + letter + "' in the word '" + word + "'. Let me try a manual approach first."
            "\n\nFirst spell the word out:\n" + word + ":" + ",".join(word) + "\n\nThen count the occurrences of '" + letter + "':\n")
    running = 0
    for p, ch in enumerate(word):
        if ch == letter:
            running += 1
            text += "%d:%s hit! count=%d\n" % (p + 1, ch, running)
        else:
            text += "%d:%s\n" % (p + 1, ch)
    text += "\nThis gives us %d." % running
    parts = [{"type": "text", "text": text},
             {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
             {"type": "python", "text": "'" + word + "'.count('" + letter + "')"},
             {"type": "python_output", "text": str(count)},
             {"type": "text", "text": "\n\nPython gives us %d.\n\nMy final answer is:\n\n#### %d" % (count, count)}]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": parts}]}


def spec_simple_words(words):
    shuffled = list(words)
    SpecRandom(42).shuffle(shuffled)
    return shuffled


def task(kind, tmp_path, **params):
    return build_task(TaskSpec(kind=kind, name=kind, params=params), tmp_path)


@pytest.fixture
def words_file(tmp_path):
    # CRLF line ends and stray spaces, as in dwyl's words_alpha.txt; one non-a-z word to show no filtering
    words = ["strawberry", "apple", "banana", "mississippi", "a", "zz", "bookkeeper", "queue", "rhythm", "naïve"]
    path = tmp_path / "words_alpha.txt"
    path.write_bytes(("\r\n".join(f" {w} " if i == 3 else w for i, w in enumerate(words)) + "\r\n").encode())
    return path, words


@pytest.mark.parametrize("split", ["train", "test"])
def test_words_file_matches_transcription(tmp_path, words_file, split):
    path, words = words_file
    simple = task("simplespelling", tmp_path, size=120, split=split, words=path.name)
    bee = task("spellingbee", tmp_path, size=120, split=split, words=str(path))
    assert len(simple) == len(bee) == 120
    shuffled = spec_simple_words(words)
    for i in range(120):
        assert simple[i] == spec_simple(shuffled, split, i)
        assert bee[i] == spec_bee(words, split, i)
    assert simple.inputs() == bee.inputs() == [path]


def test_default_list_matches_transcription(tmp_path):
    from english_words import get_english_words_set
    words = sorted(get_english_words_set(["web2"], alpha=True, lower=True))
    assert len(words) > 200_000 and all(w.isascii() and w.isalpha() and w.islower() for w in words[:1000])
    simple = task("simplespelling", tmp_path, size=200_000)
    bee = task("spellingbee", tmp_path, size=80_000)
    shuffled = spec_simple_words(words)
    for i in list(range(40)) + [199_999]:
        assert simple[i] == spec_simple(shuffled, "train", i)
    for i in list(range(40)) + [79_999]:
        assert bee[i] == spec_bee(words, "train", i)
    assert bee.inputs()[0].is_file()


def test_literal_examples_for_three_words(tmp_path):
    (tmp_path / "w.txt").write_text("cat\r\ndog\r\nemu\r\n")
    # Random(42).shuffle(3 words) -> [dog, cat, emu]; Random(0).choice(3) -> index 1; Random(10_000_000) -> 1
    simple = task("simplespelling", tmp_path, words="w.txt")
    assert simple[0] == {"messages": [{"role": "user", "content": "Spell the word: cat"},
                                      {"role": "assistant", "content": "cat:c,a,t"}]}
    assert task("simplespelling", tmp_path, words="w.txt", split="test")[0]["messages"][1]["content"] == "cat:c,a,t"
    # Random(0): word index 1 (dog); random() 0.7579 < 0.9 -> letter from the word: 'o'; template 3
    # ("Count the number of ...") lowercased; letter quoted with ", word with '; '?' appended
    bee = task("spellingbee", tmp_path, words="w.txt")
    assert bee[0] == {"messages": [
        {"role": "user", "content": "count the number of \"o\" in 'dog'?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "We are asked to find the number 'o' in the word 'dog'. Let me try a manual approach "
                                     "first.\n\nFirst spell the word out:\ndog:d,o,g\n\nThen count the occurrences of "
                                     "'o':\n1:d\n2:o hit! count=1\n3:g\n\nThis gives us 1."},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": "'dog'.count('o')"},
            {"type": "python_output", "text": "1"},
            {"type": "text", "text": "\n\nPython gives us 1.\n\nMy final answer is:\n\n#### 1"},
        ]},
    ]}
    assert bee[1]["messages"][0]["content"] == "how many times is 'c' in 'cat'"
    assert bee.locate(0) == (str(tmp_path / "w.txt"), 2)  # dog is line 2
    assert simple.locate(0) == (str(tmp_path / "w.txt"), 1)  # cat is line 1 of the file


def test_slicing_uses_physical_index_as_seed(tmp_path, words_file):
    path, words = words_file
    bee = build_task(TaskSpec("spellingbee", "b", {"size": 50, "words": str(path)}, start=7, stop=30, step=4), tmp_path)
    assert len(bee) == 6  # ceil(23 / 4)
    assert [bee[k] for k in range(6)] == [spec_bee(words, "train", 7 + 4 * k) for k in range(6)]


def test_bad_word_lists_and_params(tmp_path):
    (tmp_path / "blank.txt").write_text("cat\n\ndog\n")
    with pytest.raises(DataError) as e:
        task("spellingbee", tmp_path, words="blank.txt")
    assert e.value.row == 2 and e.value.file.endswith("blank.txt") and e.value.task == "spellingbee"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        task("simplespelling", tmp_path, words="empty.txt")
    with pytest.raises(SourceMissingError, match="words_alpha.txt"):
        task("simplespelling", tmp_path, words="nope.txt")
    with pytest.raises(RecipeError) as e:
        task("spellingbee", tmp_path, split="val")
    assert e.value.field == "tasks.spellingbee.params.split"
    with pytest.raises(RecipeError) as e:
        task("spellingbee", tmp_path, size="10")
    assert e.value.field == "tasks.spellingbee.params.size"
