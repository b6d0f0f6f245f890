"""Tasks: one module per source; `build_task(spec, data_dir)` turns a recipe's TaskSpec into a Task.

A Task is a list of nanochat conversation dicts, identical to what nanochat's task of the same name
returns, in the same order; see base.py for the interface and sliced view.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import DataError, RecipeError
from pipeline.recipe import TaskSpec
from pipeline.tasks import chat, customjson, gsm8k, mmlu, smoltalk, spelling
from pipeline.tasks.base import Task

__all__ = ["Task", "build_task", "KINDS"]

# kind -> (module with PARAMS, constructor)
KINDS = {
    "smoltalk": (smoltalk, smoltalk.SmolTalk),
    "mmlu": (mmlu, mmlu.MMLU),
    "gsm8k": (gsm8k, gsm8k.GSM8K),
    "customjson": (customjson, customjson.CustomJSON),
    "simplespelling": (spelling, spelling.SimpleSpelling),
    "spellingbee": (spelling, spelling.SpellingBee),
    "chat": (chat, chat.ChatTask),
}

_TYPES = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "paths": (lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0
                                                and all(isinstance(x, str) for x in v)),
              "a path/glob or a non-empty list of them"),
}


def resolve_params(kind: str, name: str, params: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
    """Check a task's params against its kind's table (unknown, missing, wrongly typed -> RecipeError).

    `where` is the task's dotted place in the recipe (`train[0]`); errors name `<where>.params.<key>`."""
    table = KINDS[kind][0].PARAMS
    where = f"{where or f'tasks.{name}'}.params"
    for key in params:
        if key not in table:
            raise RecipeError(f"unknown parameter for a {kind} task (known: {', '.join(table)})", field=f"{where}.{key}")
    out = {}
    for key, (typ, default) in table.items():
        optional = typ.endswith("?")
        check, desc = _TYPES[typ.rstrip("?")]
        if key not in params:
            if default is None and not optional:
                raise RecipeError(f"required for a {kind} task ({desc})", field=f"{where}.{key}")
            out[key] = default
            continue
        value = params[key]
        if not (check(value) or (optional and value is None)):
            raise RecipeError(f"must be {desc}, got {value!r}", field=f"{where}.{key}")
        out[key] = list(value) if isinstance(value, tuple) else value
    if kind in ("simplespelling", "spellingbee") and out["split"] not in ("train", "test"):
        raise RecipeError(f"must be train or test (it picks the per-example seeds), got {out['split']!r}",
                          field=f"{where}.split")
    return out


def build_task(spec: TaskSpec, data_dir: Path, where: str | None = None, recipe_file: str | Path | None = None) -> Task:
    """The task a spec names, viewed through its start/stop/step (`repeat` is the mixture's business).

    With `where` (`train[0]`) and `recipe_file`, a recipe error names the file and the dotted field there."""
    try:
        if spec.kind not in KINDS:
            raise RecipeError(f"unknown task kind {spec.kind!r} (known: {', '.join(KINDS)})",
                              field=f"tasks.{spec.name}.kind")
        params = resolve_params(spec.kind, spec.name, spec.params, where)
        try:
            task = KINDS[spec.kind][1](spec.name, Path(data_dir), **params)
        except DataError as e:
            raise e.located(task=spec.name) from None
        return task.set_view(spec.start, spec.stop, spec.step)
    except RecipeError as e:
        if where is None or e.file is not None:
            raise
        own = f"tasks.{spec.name}"
        field = where + e.field[len(own):] if e.field and e.field.startswith(own) else e.field
        raise RecipeError(e.reason, file=recipe_file, field=field, task=e.task) from None
