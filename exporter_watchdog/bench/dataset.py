"""Benchmark prompts: a seeded random dataset of fixed lengths, or prompts read from a JSONL file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Common English words: one token each in most tokenizers, so --input-len is close to the real count.
VOCABULARY = (
    "the of and to in is was for on are with as be at by this had not but from or have an they which one "
    "you were all her she there would their we him been has when who will more no if out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now "
    "such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make "
    "world still own see men work long get here between both life being under never day same another know "
    "while last might us great old year off come since against go came right used take three small large "
    "place power water light house point city story river field paper music table window garden morning"
).split()


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file, the line and the key."""


@dataclass(frozen=True)
class Prompt:
    """One request to send: chat messages, the expected prompt length (if known) and the output length."""

    messages: tuple[dict[str, Any], ...]
    output_len: int
    input_len: int | None = None


def random_prompts(n: int, input_len: int, output_len: int, seed: int) -> list[Prompt]:
    """n prompts of exactly input_len vocabulary words each, different per prompt, the same for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(VOCABULARY) for _ in range(input_len))
        out.append(Prompt(({"role": "user", "content": text},), output_len, input_len))
    return out


def load_jsonl(path: Path, n: int, output_len: int, seed: int) -> list[Prompt]:
    """n prompts from a JSONL file (`prompt` or `messages`, optional `output_len`/`max_tokens` per line).

    The lines are shuffled with the seed; a file with fewer lines than n is reused from the start.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the dataset: {exc}") from exc
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            prompts.append(_parse_line(path, lineno, line, output_len))
    if not prompts:
        raise DatasetError(f"{path}: no prompts (expected one JSON object per line with 'prompt' or 'messages')")
    random.Random(seed).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


def _parse_line(path: Path, lineno: int, line: str, output_len: int) -> Prompt:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc.msg}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    out = output_len
    for key in ("output_len", "max_tokens"):
        if key in obj:
            value = obj[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DatasetError(f"{where}: key '{key}': expected a positive integer, got {value!r}")
            out = value
    if "messages" in obj:
        messages = obj["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
                           for m in messages)):
            raise DatasetError(f"{where}: key 'messages': expected a non-empty list of "
                               f"{{'role': ..., 'content': ...}} objects, got {_short(messages)}")
        return Prompt(tuple(messages), out)
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: key 'prompt': expected a non-empty string, got {_short(prompt)}")
        return Prompt(({"role": "user", "content": prompt},), out)
    raise DatasetError(f"{where}: missing key 'prompt' or 'messages' (keys present: {sorted(obj)})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
