"""Training data: JSONL in the formats people already have, tokenized with a loss mask.

One record per line, one of:
  {"prompt": ..., "completion": ...}   loss on the completion
  {"messages": [{"role", "content"}...]}  chat template applied; loss on assistant turns
  {"text": ...}                         loss on every token
`train_on_prompt=True` puts the loss on every token of every format. A line that is not
valid JSON or lacks the fields is reported with its line number and skipped, or stops the
run (`on_error="stop"`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import attrs
import numpy as np

from stratlm.core.errors import ConfigError
from stratlm.core.log import get_logger
from stratlm.core.tokenizer import Tokenizer

log = get_logger(__name__)

ON_ERROR = ("skip", "stop")


@attrs.frozen
class Example:
    """Token ids and, per token, whether predicting it counts in the loss."""

    tokens: tuple[int, ...] = attrs.field(converter=tuple)
    loss_mask: tuple[bool, ...] = attrs.field(converter=tuple)

    def __len__(self) -> int:
        return len(self.tokens)


@attrs.frozen
class Dataset:
    examples: tuple[Example, ...] = attrs.field(converter=tuple)
    skipped: tuple[str, ...] = attrs.field(default=(), converter=tuple)  # "line N: why"

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def loss_tokens(self) -> int:
        return sum(sum(e.loss_mask) for e in self.examples)

    def split(self, valid_fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """(train, valid): a seeded random `valid_fraction` of the examples held out (at least one)."""
        if not 0 < valid_fraction < 1:
            raise ConfigError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
        if len(self) < 2:
            raise ConfigError(f"a validation split needs at least 2 examples; the dataset has {len(self)}")
        order = np.random.default_rng(seed).permutation(len(self))
        n_valid = min(len(self) - 1, max(1, round(valid_fraction * len(self))))
        valid = [self.examples[i] for i in sorted(order[:n_valid])]
        train = [self.examples[i] for i in sorted(order[n_valid:])]
        return Dataset(train, self.skipped), Dataset(valid)


class DataError(ConfigError):
    """A dataset line that cannot be used; the message starts with its file and line number."""


def tokenize_record(record: Any, tokenizer: Tokenizer, train_on_prompt: bool = False) -> Example:
    """One JSON record -> an Example. Raises ValueError naming what is missing or wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return tokenize_messages(record["messages"], tokenizer, train_on_prompt)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ValueError("'prompt' and 'completion' must be strings and the completion non-empty")
        if tokenizer.has_chat_template:
            return tokenize_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenizer, train_on_prompt)
        head = tokenizer.encode(prompt)
        tail = tokenizer.encode(completion, add_special_tokens=False) + eos_tokens(tokenizer)
        return Example(head + tail, [train_on_prompt] * len(head) + [True] * len(tail))
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise ValueError("'text' must be a non-empty string")
        ids = tokenizer.encode(text) + eos_tokens(tokenizer)
        return Example(ids, [True] * len(ids))
    raise ValueError(f"a record needs 'prompt' and 'completion', 'messages', or 'text'; it has {', '.join(map(repr, sorted(record))) or 'no fields'}")


def eos_tokens(tokenizer: Tokenizer) -> list[int]:
    eos = tokenizer.hf.eos_token_id
    return [int(eos)] if eos is not None else []


def tokenize_messages(messages: Any, tokenizer: Tokenizer, train_on_prompt: bool) -> Example:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects")
    if not any(m["role"] == "assistant" for m in messages) and not train_on_prompt:
        raise ValueError("'messages' has no assistant turn to learn from")
    if not tokenizer.has_chat_template:
        raise ValueError("'messages' needs a chat template and this tokenizer has none; use {'text': ...} or {'prompt', 'completion'}")

    def ids(upto: int, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=generation_prompt)
        return tokenizer.encode(text, add_special_tokens=False)

    tokens = ids(len(messages), False)
    mask = [train_on_prompt] * len(tokens)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # the assistant turn is what the template adds beyond the prompt that asks for it
        start, end = len(ids(i, True)), len(ids(i + 1, False))
        for j in range(start, min(end, len(tokens))):
            mask[j] = True
    return Example(tokens, mask)


def read_records(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for each non-blank line: decoded by the caller, so a line that is
    not UTF-8 is reported by its number like any other bad line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset file not found: {path} (expected a .jsonl file, one JSON object per line)")
    try:
        with path.open("rb") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    yield number, line
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {path}: {exc.strerror or exc}") from exc


def decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8") from exc


def load_jsonl(path: str | Path, tokenizer: Tokenizer, *, train_on_prompt: bool = False, on_error: str = "skip", max_length: int | None = None) -> Dataset:
    """Read and tokenize a JSONL file. Bad lines are skipped with a warning naming them, or raise DataError."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    examples, skipped = [], []
    for number, line in read_records(path):
        try:
            example = tokenize_record(json.loads(decode_line(line)), tokenizer, train_on_prompt)
            if not any(example.loss_mask[1:]):
                raise ValueError("no token to learn from after the prompt")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            reason = f"not valid JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else str(exc)
            message = f"{path} line {number}: {reason}"
            if on_error == "stop":
                raise DataError(message + " (on_error='skip', the CLI's default without --stop-on-bad-lines, skips such lines)") from exc
            log.warning("skipping dataset line", file=str(path), line=number, reason=reason)
            skipped.append(message)
            continue
        if max_length is not None and len(example) > max_length:
            example = Example(example.tokens[:max_length], example.loss_mask[:max_length])
        examples.append(example)
    if not examples:
        raise DataError(f"{path} has no usable records" + (f"; first problem: {skipped[0]}" if skipped else " (the file is empty)"))
    return Dataset(examples, skipped)


def from_records(records: Iterable[dict], tokenizer: Tokenizer, *, train_on_prompt: bool = False) -> Dataset:
    """Tokenize in-memory records (the same formats as the JSONL lines)."""
    return Dataset([tokenize_record(r, tokenizer, train_on_prompt) for r in records])


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- batches ---------------------------------------------------------------------------------------
PAD_MULTIPLE = 16  # batch lengths are rounded up to this, so the compiled step sees few shapes


def batch_arrays(examples: Sequence[Example], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (B, T) int32, loss weights (B, T) float32), right-padded; weights 0 on padding."""
    longest = max(len(e) for e in examples)
    width = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.full((len(examples), width), pad_id, dtype=np.int32)
    weights = np.zeros((len(examples), width), dtype=np.float32)
    for row, e in enumerate(examples):
        tokens[row, : len(e)] = e.tokens
        weights[row, : len(e)] = e.loss_mask
    return tokens, weights


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a seeded permutation, cut into full batches (the last may be short)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return [order[i : i + batch_size].tolist() for i in range(0, n_examples, batch_size)]


def micro_batch(dataset: Dataset, batch_size: int, seed: int, index: int) -> list[Example]:
    """The `index`-th batch of an endless, seeded stream of epochs: a pure function of its arguments,
    so a resumed run sees exactly the batches the interrupted one would have."""
    per_epoch = -(-len(dataset) // batch_size)
    epoch, within = divmod(index, per_epoch)
    return [dataset.examples[i] for i in batch_order(len(dataset), batch_size, seed, epoch)[within]]
