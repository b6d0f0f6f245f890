"""nanochat's chat template: a conversation -> (token ids, supervision mask) (reference §2).

The whole conversation is checked before anything is encoded, so a bad row fails with the exact field
(`messages[3].content[1].type`) and never half-renders. No truncation here: the packer knows the row size.
"""
from __future__ import annotations

from pipeline.errors import ConversationError
from pipeline.tokenizer import ChatTokenizer

TEMPLATE_VERSION = 1  # bump whenever the rendered bytes change

MASK_POLICIES = ("assistant", "all")
NANOCHAT_MAX_TOKENS = 2048  # nanochat's render_conversation(max_tokens=2048) default; `overlong = "nanochat"` cuts here
PART_TYPES = ("text", "python", "python_output")


def _kind(x) -> str:
    return "None" if x is None else type(x).__name__


def _turns(conversation) -> list[tuple[str, object]]:
    """Validated (role, content) turns after the system merge; the input is never modified.

    Fields in errors use the indices of the input messages (before the merge)."""
    if not isinstance(conversation, dict):
        raise ConversationError(f"expected a conversation dict with a 'messages' list, found {_kind(conversation)}")
    if "messages" not in conversation:
        raise ConversationError("missing key 'messages'", field="messages")
    messages = conversation["messages"]
    if not isinstance(messages, list):
        raise ConversationError(f"expected a list of messages, found {_kind(messages)}", field="messages")
    if not messages:
        raise ConversationError("expected at least one message, found an empty list", field="messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConversationError(f"expected a message dict with 'role' and 'content', found {_kind(m)}",
                                    field=f"messages[{j}]")
        for key in ("role", "content"):
            if key not in m:
                raise ConversationError(f"missing key {key!r}", field=f"messages[{j}].{key}")

    start = 0
    system = None
    if messages[0]["role"] == "system":
        system = messages[0]["content"]
        if not isinstance(system, str):
            raise ConversationError(f"expected a string, found {_kind(system)}", field="messages[0].content")
        if len(messages) < 2:
            raise ConversationError("a system message must be followed by a user message, found none",
                                    field="messages")
        if messages[1]["role"] != "user":
            raise ConversationError(f"expected 'user' after the system message, found {messages[1]['role']!r}",
                                    field="messages[1].role")
        start = 1

    turns = []
    for j in range(start, len(messages)):
        role, content = messages[j]["role"], messages[j]["content"]
        expected = "user" if (j - start) % 2 == 0 else "assistant"
        if role != expected:
            where = "a system message is allowed only first; " if role == "system" else ""
            raise ConversationError(f"{where}expected {expected!r} (messages alternate user/assistant, starting "
                                    f"with user), found {role!r}", field=f"messages[{j}].role")
        if role == "user":
            if not isinstance(content, str):
                raise ConversationError(f"expected a string, found {_kind(content)}", field=f"messages[{j}].content")
            if system is not None and j == 1:
                content = system + "\n\n" + content
        elif isinstance(content, list):
            for k, part in enumerate(content):
                field = f"messages[{j}].content[{k}]"
                if not isinstance(part, dict):
                    raise ConversationError(f"expected a part dict with 'type' and 'text', found {_kind(part)}",
                                            field=field)
                if "type" not in part:
                    raise ConversationError("missing key 'type'", field=f"{field}.type")
                if part["type"] not in PART_TYPES:
                    raise ConversationError(f"expected one of {', '.join(map(repr, PART_TYPES))}, "
                                            f"found {part['type']!r}", field=f"{field}.type")
                if "text" not in part:
                    raise ConversationError("missing key 'text'", field=f"{field}.text")
                if not isinstance(part["text"], str):
                    raise ConversationError(f"expected a string, found {_kind(part['text'])}", field=f"{field}.text")
        elif not isinstance(content, str):
            raise ConversationError(f"expected a string or a list of parts, found {_kind(content)}",
                                    field=f"messages[{j}].content")
        turns.append((role, content))
    return turns


def render_conversation(conversation: dict, tok: ChatTokenizer,
                        mask_policy: str = "assistant") -> tuple[list[int], list[int]]:
    """Token ids and per-token mask (1 = supervised target) for one conversation, as nanochat renders it.

    mask_policy "assistant" is nanochat's mask; "all" supervises every token (the original SFT script);
    padding, added later by the packer, is never supervised either way."""
    if mask_policy not in MASK_POLICIES:
        raise ValueError(f"mask_policy must be one of {MASK_POLICIES}, got {mask_policy!r}")
    turns = _turns(conversation)
    sid = tok.special_id
    bos, us, ue = sid("<|bos|>"), sid("<|user_start|>"), sid("<|user_end|>")
    ast, aen = sid("<|assistant_start|>"), sid("<|assistant_end|>")
    ps, pe = sid("<|python_start|>"), sid("<|python_end|>")
    os_, oe = sid("<|output_start|>"), sid("<|output_end|>")
    encode = tok.encode

    ids, mask = [bos], [0]
    for role, content in turns:
        if role == "user":
            t = encode(content)
            ids.append(us); ids.extend(t); ids.append(ue)
            mask.extend([0] * (len(t) + 2))
            continue
        ids.append(ast); mask.append(0)
        if isinstance(content, str):
            t = encode(content)
            ids.extend(t); mask.extend([1] * len(t))
        else:
            for part in content:
                t = encode(part["text"])
                kind = part["type"]
                if kind == "text":
                    ids.extend(t); mask.extend([1] * len(t))
                elif kind == "python":
                    ids.append(ps); ids.extend(t); ids.append(pe)
                    mask.extend([1] * (len(t) + 2))
                else:  # python_output: produced by the tool, never a target
                    ids.append(os_); ids.extend(t); ids.append(oe)
                    mask.extend([0] * (len(t) + 2))
        ids.append(aen); mask.append(1)
    if mask_policy == "all":
        mask = [1] * len(ids)
    return ids, mask


def render_for_completion(conversation: dict, tok: ChatTokenizer) -> list[int]:
    """Prompt ids for generation: the conversation without its final assistant message, then <|assistant_start|>."""
    if isinstance(conversation, dict) and isinstance(conversation.get("messages"), list) and conversation["messages"]:
        messages = conversation["messages"]
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            found = last.get("role") if isinstance(last, dict) else _kind(last)
            raise ConversationError(f"expected the last message to be 'assistant' (it is the answer to complete), "
                                    f"found {found!r}", field=f"messages[{len(messages) - 1}].role")
        conversation = {**conversation, "messages": messages[:-1]}
    ids, _ = render_conversation(conversation, tok)
    ids.append(tok.special_id("<|assistant_start|>"))
    return ids
