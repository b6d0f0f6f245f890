"""Chat with a checkpoint in the terminal (nanochat's chat_cli): tokens stream as they are chosen, the
conversation is kept across turns, the calculator tool runs inside replies.

    python -m trainer.chat --data-dir D                 (interactive; 'clear' starts over, 'quit' ends)
    python -m trainer.chat --data-dir D -p "Hi there"   (one reply, printed, then exit)
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, TextIO

from pipeline.cli import run_cli
from pipeline.tokenizer import ChatTokenizer
from trainer.checkpoint import CheckpointError
from trainer.common import DeviceError
from trainer.engine import Engine
from trainer.inference import add_checkpoint_args, load_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainer.chat", description=__doc__.split("\n")[0])
    add_checkpoint_args(ap)
    a = ap.add_argument
    a("-p", "--prompt", default=None, help="one user message: print the reply and exit")
    a("-t", "--temperature", type=float, default=0.6)
    a("-k", "--top-k", type=int, default=50)
    a("-m", "--max-tokens", type=int, default=1024, help="max new tokens per reply")
    a("--seed", type=int, default=42)
    return ap.parse_args(argv)


class Conversation:
    """The token ids of a chat so far, rendered as nanochat renders a conversation."""

    def __init__(self, tok: ChatTokenizer):
        self.tok = tok
        sid = tok.special_id
        self.us, self.ue = sid("<|user_start|>"), sid("<|user_end|>")
        self.ast, self.aen = sid("<|assistant_start|>"), sid("<|assistant_end|>")
        self.ids = [tok.bos_id]

    def prompt(self, user: str) -> list[int]:
        """The ids to complete after the user's message (they become part of the conversation)."""
        self.ids += [self.us, *self.tok.encode(user), self.ue, self.ast]
        return list(self.ids)

    def reply(self, tokens: list[int]) -> None:
        self.ids += [*tokens, self.aen]


def stream_text(tok: ChatTokenizer, tokens: Iterable[int], write: Callable[[str], None]) -> list[int]:
    """Write the text of `tokens` as they arrive (holding back a partial UTF-8 character); returns the tokens."""
    out: list[int] = []
    shown = ""
    for t in tokens:
        out.append(t)
        text = tok.decode(out)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            continue
        write(text[len(shown):])
        shown = text
    text = tok.decode(out)
    if text != shown:
        write(text[len(shown):])
    return out


def chat_turn(engine: Engine, conv: Conversation, user: str, args, out: TextIO) -> list[int]:
    tokens = engine.stream(conv.prompt(user), max_tokens=args.max_tokens, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed)

    def write(s: str) -> None:
        out.write(s)
        out.flush()

    reply = stream_text(engine.tok, tokens, write)
    out.write("\n")
    conv.reply(reply)
    return reply


def run(args, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    loaded = load_checkpoint(args)
    engine = Engine(loaded.model, loaded.tok)
    conv = Conversation(loaded.tok)
    if args.prompt is not None:
        chat_turn(engine, conv, args.prompt, args, out)
        return 0
    out.write("nanosft chat: type a message; 'clear' starts a new conversation, 'quit' (or Ctrl-D) ends.\n")
    while True:
        out.write("\nUser: ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return 0
        user = line.strip()
        if user in ("quit", "exit"):
            return 0
        if user == "clear":
            conv = Conversation(loaded.tok)
            out.write("(new conversation)\n")
            continue
        if not user:
            continue
        out.write("Assistant: ")
        chat_turn(engine, conv, user, args, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        try:
            return run(args)
        except KeyboardInterrupt:  # leaving a chat with Ctrl-C is not a failure
            print()
            return 0
    return run_cli(body, errors=(CheckpointError, DeviceError))


if __name__ == "__main__":
    sys.exit(main())
