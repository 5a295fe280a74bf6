"""Dataset loading and tokenization, shared by every trainer on both backends.

Data comes in as a .jsonl file, a directory with train/valid/test.jsonl (mlx-lm layout), a list
of dicts, an HF ``Dataset``/``DatasetDict`` (or any mapping of split -> rows), or a hub dataset
id. Three row families (DESIGN.md section 5):

- SFT: ``{"text"}`` | ``{"prompt","completion"}`` | ``{"messages": [{"role","content"}...]}``
  (ShareGPT ``{"conversations": [{"from","value"}...]}`` is read as messages).
- Preference (DPO/CPO/ORPO/reward): ``{"prompt","chosen","rejected"}``, optional ``system``.
- Prompt (GRPO family, online algorithms): ``{"prompt", ...other columns}``.

Tokens are plain Python ints and batches are numpy arrays, so nothing here imports mlx or torch.
Every bad input raises ``DataError`` with one line that names the file and line (or row), key
or split.

BOS: rendered chat templates are tokenized with ``add_special_tokens=False`` (the template
writes BOS itself when the model wants one); plain strings get whatever leading special tokens
the tokenizer adds on its own (Llama's BOS; nothing for SmolLM2/Qwen), and never a trailing one.
"""

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Bad training data; the message names the file:line, row, key or split."""


SFT_FORMATS = ('{"text"}, {"prompt","completion"}, {"messages":[{"role","content"},...]} '
               'or {"conversations":[{"from","value"},...]}')
PREFERENCE_FORMAT = '{"prompt","chosen","rejected"} (strings or message lists), optional "system"'
PROMPT_FORMAT = '{"prompt", ...other columns} (prompt a string or a message list)'

# File names that hold each split in a data directory; the first one found wins.
SPLIT_FILES = {
    "train": ("train.jsonl",),
    "valid": ("valid.jsonl", "validation.jsonl", "val.jsonl"),
    "test": ("test.jsonl",),
}
SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid", "eval": "valid"}

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "bot": "assistant", "system": "system", "tool": "tool"}


# ---------------------------------------------------------------------------------------------
# Loading rows


class Rows(list):
    """A list of row dicts that remembers where it came from, so that errors raised while
    tokenizing can name the file and line (blank lines make row index and line number differ)."""

    def __init__(self, rows, source: str, line_numbers: list[int] | None = None):
        super().__init__(rows)
        self.source = source
        self.line_numbers = line_numbers

    def where(self, index: int) -> str:
        if self.line_numbers is not None:
            return f"{self.source}:{self.line_numbers[index]}"
        return f"{self.source} row {index + 1}"


def _canonical_split(split: str) -> str:
    return SPLIT_ALIASES.get(split, split)


def _split_keys(split: str) -> list[str]:
    """Names a split may go by in a DatasetDict / mapping, e.g. valid -> valid, validation, val."""
    split = _canonical_split(split)
    names = [split] + [alias for alias, canon in SPLIT_ALIASES.items() if canon == split]
    return names


def _split_file(directory: Path, split: str) -> Path | None:
    split = _canonical_split(split)
    for name in SPLIT_FILES.get(split, (f"{split}.jsonl",)):
        if (directory / name).is_file():
            return directory / name
    return None


def _looks_like_path(data: str) -> bool:
    """A string that can only be meant as a local path (a hub id is "owner/name")."""
    return (data.startswith(("/", "./", "../", "~")) or data.endswith((".jsonl", ".json"))
            or os.sep != "/" and os.sep in data)


def _is_hf_dataset(data) -> bool:
    # Duck-typed so that `datasets` stays an optional dependency.
    return hasattr(data, "column_names") and hasattr(data, "features")


def read_jsonl(path: Path) -> Rows:
    """Rows of a JSON-lines file (UTF-8, a leading byte-order mark allowed); blank lines are skipped."""
    rows, line_numbers = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_number}: malformed JSON ({e.msg} at column {e.colno})"
                                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                line_numbers.append(line_number)
    except UnicodeDecodeError:
        # The text reader decodes whole blocks, so its error knows neither the line nor the offset.
        raise DataError(_not_utf8_message(path)) from None
    if not rows:
        raise DataError(f"{path}: empty file, no rows")
    return Rows(rows, str(path), line_numbers)


def _not_utf8_message(path: Path) -> str:
    """Where the first byte that is not UTF-8 lies: line, column and offset in the file."""
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head in (b"\xff\xfe", b"\xfe\xff"):
            return f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
        offset = 0
        for line_number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8-sig")) + 1
                return (f"{path}:{line_number}: not UTF-8 text: byte 0x{raw[e.start]:02x} at column {column} "
                        f"(byte offset {offset + e.start} in the file) cannot be decoded ({e.reason}); "
                        "save the file as UTF-8")
            offset += len(raw)
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def _rows_from_list(rows, source: str) -> Rows:
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{source} row {i + 1}: expected a dict, got {type(row).__name__}")
    if not rows:
        raise DataError(f"{source}: no rows")
    return Rows([dict(row) for row in rows], source)


def _load_hub(data: str, split: str) -> Rows:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{data!r} is neither a local file nor a directory, and loading it from the "
                        "Hugging Face Hub needs the 'datasets' package (pip install datasets)") from None
    try:
        loaded = datasets.load_dataset(data)
    except Exception as e:  # offline, no such repo, no access: all end the same way for the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{data!r} is not a local file or directory, and loading it as a Hugging Face "
                        f"Hub dataset failed (offline? HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): "
                        f"{first_line}") from None
    return _rows_from_mapping(loaded, split, f"dataset {data!r}")


def _rows_from_mapping(data: Mapping, split: str, source: str) -> Rows:
    for key in _split_keys(split):
        if key in data:
            return _rows_from_list(data[key], f"{source} split {key!r}")
    raise DataError(f"{source}: no {split!r} split (splits: {', '.join(map(str, data)) or 'none'})")


def load_rows(data, split: str = "train") -> list[dict]:
    """The rows of one split of `data`, as a list of dicts (a ``Rows`` that knows its source).

    `data`: a .jsonl file, a directory holding train.jsonl / valid.jsonl (or validation.jsonl,
    val.jsonl) / test.jsonl, a list of dicts, an HF Dataset, a DatasetDict or other mapping of
    split -> rows, or a hub dataset id. A single file, list or Dataset is returned whatever
    `split` asks for (the caller named that data explicitly); ``has_split`` reports it as
    "train" only, so trainers don't evaluate on their training data by accident.
    """
    if isinstance(data, Rows):
        return data
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if path.is_dir():
            file = _split_file(path, split)
            if file is None:
                wanted = " or ".join(SPLIT_FILES.get(_canonical_split(split), (f"{split}.jsonl",)))
                raise DataError(f"{path}: no {split!r} split (no {wanted} in the directory)")
            return read_jsonl(file)
        if path.is_file():
            return read_jsonl(path)
        if isinstance(data, os.PathLike) or _looks_like_path(str(data)):
            raise DataError(f"{data}: no such file or directory")
        return _load_hub(str(data), split)
    if _is_hf_dataset(data):
        return _rows_from_list(data, f"dataset split '{getattr(data, 'split', None) or split}'")
    if isinstance(data, Mapping):  # DatasetDict is a dict subclass
        return _rows_from_mapping(data, split, "dataset")
    if isinstance(data, (list, tuple)) or hasattr(data, "__iter__"):
        return _rows_from_list(data, "<rows>")
    raise DataError(f"cannot read training data from a {type(data).__name__}: expected a .jsonl path, "
                    "a directory, a list of dicts, an HF Dataset or a hub dataset id")


def has_split(data, split: str) -> bool:
    """Whether `data` holds `split` (e.g. so a trainer knows whether validation data exists)."""
    split = _canonical_split(split)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if path.is_dir():
            return _split_file(path, split) is not None
        if path.is_file() or isinstance(data, os.PathLike) or _looks_like_path(str(data)):
            return split == "train"
        try:
            import datasets

            names = datasets.get_dataset_split_names(str(data))
        except Exception:
            return False
        return any(key in names for key in _split_keys(split))
    if isinstance(data, Mapping):
        return any(key in data for key in _split_keys(split))
    return split == "train"


# ---------------------------------------------------------------------------------------------
# Tokenizer helpers


def _hf_tokenizer(tokenizer):
    """The HF tokenizer itself: mlx-lm's TokenizerWrapper forwards attributes but is not callable,
    and we need __call__ for offsets. Chat templates still go through the wrapper (it knows the
    model's thinking switch)."""
    if not callable(tokenizer) and hasattr(tokenizer, "_tokenizer"):
        return tokenizer._tokenizer
    return tokenizer


def has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if isinstance(flag, bool):
        return flag
    return getattr(tokenizer, "chat_template", None) is not None


def _encode(tokenizer, text: str) -> list[int]:
    return list(_hf_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"])


# Over-long texts are cut before they are tokenized: a 30 MB line would otherwise be tokenized
# whole (minutes, gigabytes) only to keep its first max_seq_length tokens. A cut is made only
# where it cannot change the tokens kept, so truncation keeps exactly the tokens it kept before.
#
# First guess at the characters that hold a number of tokens: generous (English text averages
# about 4 characters a token), and grown when the cut text still holds too few tokens.
_CHARS_PER_TOKEN = 32
# Tokens the cut text must hold beyond the kept ones. Tokenizing a cut text can change the tokens
# next to the cut (a word cut in two, a merge across it), never as far as this from it: BPE and
# unigram tokenizers decide each token from the text around it (tests/test_input_errors.py checks
# byte-level BPE, BPE whose tokens span words, and unigram).
_SLACK_TOKENS = 64


def _head_text(tokenizer, text: str, keep: int) -> str:
    """`text`, or, where it holds far more than `keep` tokens, a beginning of it whose tokens start
    with the same `keep` tokens as the whole text's. The beginning holds more than `keep` tokens,
    so the caller still truncates the sample and counts it as truncated."""
    chars = (keep + _SLACK_TOKENS) * _CHARS_PER_TOKEN
    while chars < len(text):
        head = text[:_space_near(text, chars)]
        if len(_encode(tokenizer, head)) >= keep + _SLACK_TOKENS:
            return head
        chars *= 4
    return text


def _tail_text(tokenizer, text: str, keep: int) -> str:
    """As ``_head_text`` for the end of `text`: an end of it whose last `keep` tokens are the whole
    text's last `keep` tokens (for prompts, which keep their last tokens)."""
    chars = (keep + _SLACK_TOKENS) * _CHARS_PER_TOKEN
    while chars < len(text):
        tail = text[_space_near(text, len(text) - chars):]
        if len(_encode(tokenizer, tail)) >= keep + _SLACK_TOKENS:
            return tail
        chars *= 4
    return text


def _space_near(text: str, position: int) -> int:
    """A space's position just before `position`, or `position` itself where there is none near:
    a cut between two words disturbs the fewest tokens."""
    space = text.rfind(" ", max(0, position - 200), position)
    return space if space > 0 else position


def _leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of plain text by itself (e.g. Llama's BOS).
    Found by comparing encodings with and without special tokens, so a tokenizer that also
    appends EOS doesn't get it mid-sequence."""
    hf = _hf_tokenizer(tokenizer)
    plain = list(hf("a", add_special_tokens=False)["input_ids"])
    with_special = list(hf("a", add_special_tokens=True)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    return []


def _eos_ids(tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:
        raise DataError(f"{where}: the chat template rejected this conversation: {e}") from None
    if not isinstance(text, str):
        raise DataError(f"{where}: apply_chat_template(tokenize=False) returned {type(text).__name__}, not text")
    return text


def _need_chat_template(tokenizer, where: str, what: str):
    if not has_chat_template(tokenizer):
        raise DataError(f"{where}: {what} need a tokenizer with a chat template, and this tokenizer has "
                        "none (set tokenizer.chat_template, or use plain-text rows)")


def _messages(value, where: str, key: str) -> list[dict]:
    """Validate a message list (or read a ShareGPT one) into [{"role", "content", ...}]."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages, got {_describe(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if "role" not in message and "from" in message:  # ShareGPT
            role = SHAREGPT_ROLES.get(message["from"], message["from"])
            message = {"role": role, "content": message.get("value")}
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise DataError(f"{where}: {key}[{i}] has no 'role' string (keys: {sorted(message)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}] ({role}) 'content' must be a string, got {_describe(content)}")
        messages.append(message)
    return messages


def _as_messages(value, role: str, where: str, key: str) -> list[dict]:
    """A message list as it is, or a string as one message from `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(value, where, key)
    raise DataError(f"{where}: {key!r} must be a string or a message list, got {_describe(value)}")


def _describe(value) -> str:
    return "nothing" if value is None else type(value).__name__


def _string(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {_describe(value)}")
    return value


# ---------------------------------------------------------------------------------------------
# SFT


@dataclass
class Example:
    """One SFT sample. loss_mask[i] == 1: token i is a training target (predicted from tokens < i).
    loss_mask[0] is always 0: nothing comes before the first token to predict it from."""

    input_ids: list[int]
    loss_mask: list[int]


def _char_spans_to_mask(tokenizer, text: str, spans: list[tuple[int, int]], max_tokens: int | None = None):
    """Tokenize `text` once and mark the tokens that start inside one of the character spans.
    With `max_tokens`, a text far longer than that is tokenized only as far as truncation to
    max_tokens can see (``_head_text``).

    A token straddling a span's start (partly template header) is left out; one straddling its
    end is kept. Fast tokenizers give offsets; for others, a boundary's token index is the length
    of the tokenized text before it (exact where tokenization is stable at that boundary, which
    template boundaries - special tokens and newlines - are).
    """
    hf = _hf_tokenizer(tokenizer)
    if max_tokens is not None:
        text = _head_text(tokenizer, text, max_tokens)  # spans past its end mark nothing that is kept
    try:
        encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        mask = [int(any(start <= a < end for start, end in spans)) for a, _ in offsets]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        ids = _encode(tokenizer, text)
        mask = [0] * len(ids)
        for start, end in spans:
            first, last = len(_encode(tokenizer, text[:start])), len(_encode(tokenizer, text[:end]))
            for i in range(first, min(last, len(ids))):
                mask[i] = 1
    return ids, mask


def _assistant_spans(tokenizer, messages: list[dict], full: str, first_target: int, where: str):
    """Character spans of assistant turns (index >= first_target) in the rendered conversation:
    from after the template's assistant header to the end-of-turn token included, trailing
    newline excluded (the model stops at the end-of-turn token, it never generates what follows).

    The start is where the template's generation prompt for that turn ends; the end is where the
    conversation rendered up to that turn ends. Templates that render a turn differently once it
    is no longer the last one (Qwen3 drops empty <think> blocks from history) fail the prefix
    check; then the turn's content is located in the full text and extended over the end-of-turn
    marker the template wrote after it.
    """
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_target:
            continue
        header = _render(tokenizer, messages[:i], True, where) if i > 0 else None
        upto = _render(tokenizer, messages[:i + 1], False, where)
        if header is not None and upto.startswith(header) and full.startswith(upto):
            start, end = len(header), len(upto.rstrip())
        else:
            content = message["content"]
            header_ok = header is not None and full.startswith(header)
            content_at = full.find(content, max(cursor, len(header) if header_ok else 0))
            if content_at < 0:
                raise DataError(f"{where}: cannot find assistant message {i} in the rendered chat template")
            start = len(header) if header_ok else content_at
            end = content_at + len(content)
            after_content = upto[upto.rfind(content) + len(content):] if content else ""
            end_of_turn = after_content.strip()
            if end_of_turn and full.startswith(end_of_turn, end):
                end += len(end_of_turn)
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    return spans


def _tokenize_messages(tokenizer, messages, first_target: int, train_on_prompt: bool, where: str,
                       max_tokens: int | None = None):
    full = _render(tokenizer, messages, False, where)
    if train_on_prompt:
        spans = [(0, len(full))]
    else:
        spans = _assistant_spans(tokenizer, messages, full, first_target, where)
    return _char_spans_to_mask(tokenizer, full, spans, max_tokens)


def _tokenize_sft_row(row: dict, tokenizer, train_on_prompt: bool, where: str, bos: list[int],
                      eos: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """The row's ids and loss mask; at least its first max_tokens ids are exact (see
    ``_head_text``): tokenize_sft keeps the first max_seq_length."""
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        messages = _messages(row[key], where, key)
        _need_chat_template(tokenizer, where, f"{key!r} rows")
        return _tokenize_messages(tokenizer, messages, 0, train_on_prompt, where, max_tokens)
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            # TRL's conversational prompt-completion: the chat template renders both; only the
            # completion's assistant turns are targets.
            prompt_messages = _as_messages(prompt, "user", where, "prompt")
            messages = prompt_messages + _as_messages(completion, "assistant", where, "completion")
            _need_chat_template(tokenizer, where, "message-list prompts/completions")
            return _tokenize_messages(tokenizer, messages, len(prompt_messages), train_on_prompt, where,
                                      max_tokens)
        # Plain strings are concatenated as they are (TRL's behaviour); tokenized separately so
        # that the prompt's tokens are the ones the model will see at generation time.
        prompt_ids = bos + _encode(tokenizer, _head_text(tokenizer, _string(row, "prompt", where), max_tokens))
        completion_ids = _encode(tokenizer, _head_text(tokenizer, _string(row, "completion", where), max_tokens)) + eos
        mask = [int(train_on_prompt)] * len(prompt_ids) + [1] * len(completion_ids)
        return prompt_ids + completion_ids, mask
    if "text" in row:
        ids = bos + _encode(tokenizer, _head_text(tokenizer, _string(row, "text", where), max_tokens)) + eos
        return ids, [0] * len(bos) + [1] * (len(ids) - len(bos))
    raise DataError(f"{where}: no SFT format matches the keys {sorted(row)}; accepted formats: {SFT_FORMATS}")


def tokenize_sft(rows, tokenizer, max_seq_length: int, train_on_prompt: bool = False,
                 source: str = "<rows>") -> tuple[list[Example], dict]:
    """Tokenize SFT rows into Examples with loss masks, truncated to max_seq_length.

    Loss falls on completion / assistant tokens (each assistant turn's end-of-turn token
    included, its header excluded) unless train_on_prompt; on every token of "text" rows.
    prompt/completion strings are joined as they are and get EOS appended; "text" rows get EOS
    too. A sample left with no target token (after truncation, or with no assistant turn) is
    dropped. Returns (examples, stats) with num_examples, num_truncated, num_dropped,
    num_tokens, num_target_tokens.
    """
    rows = load_rows(rows)
    if source == "<rows>":
        source = rows.source
    bos, eos = _leading_special_ids(tokenizer), _eos_ids(tokenizer)
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows):
        where = rows.where(i) if rows.source == source else f"{source} row {i + 1}"
        ids, mask = _tokenize_sft_row(row, tokenizer, train_on_prompt, where, bos, eos, max_seq_length)
        if len(ids) > max_seq_length:
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
            truncated += 1
        if mask:
            mask[0] = 0
        if not any(mask):
            dropped += 1
            continue
        examples.append(Example(ids, mask))
    if truncated:
        warnings.warn(f"{source}: {truncated} of {len(rows)} samples were longer than "
                      f"max_seq_length={max_seq_length} tokens and were truncated", stacklevel=2)
    if not examples:
        raise DataError(f"{source}: no sample has a token to train on ({dropped} dropped: no completion / "
                        "assistant tokens within max_seq_length)")
    stats = {"num_examples": len(examples), "num_truncated": truncated, "num_dropped": dropped,
             "num_tokens": sum(len(e.input_ids) for e in examples),
             "num_target_tokens": sum(sum(e.loss_mask) for e in examples)}
    return examples, stats


def load_sft_dataset(data, tokenizer, max_seq_length: int, split: str = "train",
                     train_on_prompt: bool = False) -> tuple[list[Example], dict]:
    rows = load_rows(data, split)
    return tokenize_sft(rows, tokenizer, max_seq_length, train_on_prompt, source=rows.source)


# ---------------------------------------------------------------------------------------------
# Batching


def num_batches(examples, batch_size: int) -> int:
    return math.ceil(len(examples) / batch_size)


def iterate_batches(examples, batch_size: int, *, seed: int, epoch: int = 0, shuffle: bool = True,
                    pad_id: int, max_seq_length: int | None = None,
                    sort_by_length: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of (input_ids int32 (B, T), loss_mask float32 (B, T)) batches, right-padded.

    T is the batch's longest sample rounded up to a multiple of 8 (fewer distinct shapes, so
    fewer recompiles), capped at max_seq_length when given. The order depends only on
    (seed, epoch), so a resumed run can skip the batches it has done. The last partial batch is
    kept. sort_by_length (mlx-lm's bucketing) batches samples of similar length together, then
    shuffles the order of the batches: less padding, less randomness within a batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pad_id is None:
        raise ValueError("pad_id is required (use the tokenizer's pad or EOS token id)")
    rng = np.random.default_rng([int(seed), int(epoch)])
    if sort_by_length:
        order = np.argsort([len(e.input_ids) for e in examples], kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
    else:
        order = rng.permutation(len(examples)) if shuffle else np.arange(len(examples))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in batches:
        chosen = [examples[i] for i in batch]
        longest = max(len(e.input_ids) for e in chosen)
        width = -(-longest // 8) * 8
        if max_seq_length is not None:
            width = max(longest, min(width, max_seq_length))
        input_ids = np.full((len(chosen), width), pad_id, dtype=np.int32)
        loss_mask = np.zeros((len(chosen), width), dtype=np.float32)
        for row, example in enumerate(chosen):
            input_ids[row, :len(example.input_ids)] = example.input_ids
            loss_mask[row, :len(example.loss_mask)] = example.loss_mask
        yield input_ids, loss_mask


# ---------------------------------------------------------------------------------------------
# Preference pairs and prompts


@dataclass
class PreferenceExample:
    """prompt_ids end with the assistant generation header when there is a chat template;
    chosen_ids / rejected_ids are completion tokens including EOS / end-of-turn."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class PromptExample:
    """prompt_text is what the model sees (the rendered chat template); prompt is the row's
    prompt as given (string or messages), which TRL-style reward functions receive as `prompts`;
    columns are the row's other columns, passed to reward functions as keyword arguments."""

    prompt_ids: list[int]
    prompt_text: str
    columns: dict = field(default_factory=dict)
    prompt: object = None


def _prompt_messages(prompt, system, where: str) -> list[dict]:
    messages = _as_messages(prompt, "user", where, "prompt")
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def _render_prompt(row: dict, tokenizer, where: str, bos: list[int], system=None,
                   max_prompt_length: int | None = None, max_length: int | None = None):
    """The prompt as text and ids, plus its messages when a chat template rendered it.
    With a chat template, a string prompt becomes one user message and the text ends with the
    assistant generation header; without one, the string is used as it is.

    The ids are all of the prompt's, except for a prompt far longer than the caller can keep:
    then its last max_prompt_length ids are exact, or with no max_prompt_length, its first
    max_length (enough to see that it leaves no room for a completion)."""
    prompt = row["prompt"]
    if not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: 'prompt' must be a string or a message list, got {_describe(prompt)}")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string, got {_describe(system)}")
    if has_chat_template(tokenizer):
        messages = _prompt_messages(prompt, system, where)
        text = _render(tokenizer, messages, True, where)
        return text, _encode(tokenizer, _prompt_part(tokenizer, text, max_prompt_length, max_length)), messages
    if isinstance(prompt, list):
        _need_chat_template(tokenizer, where, "message-list prompts")
    text = prompt if system is None else f"{system}\n\n{prompt}"
    return text, bos + _encode(tokenizer, _prompt_part(tokenizer, text, max_prompt_length, max_length)), None


def _prompt_part(tokenizer, text: str, max_prompt_length: int | None, max_length: int | None) -> str:
    """The part of a prompt's text worth tokenizing: prompts keep their last max_prompt_length
    tokens; with no such limit, only whether the prompt is longer than max_length matters."""
    if max_prompt_length is not None:
        return _tail_text(tokenizer, text, max_prompt_length)
    if max_length is not None:
        return _head_text(tokenizer, text, max_length)
    return text


def _completion_ids(value, key: str, tokenizer, messages, prompt_text: str, eos: list[int],
                    where: str, max_tokens: int) -> list[int]:
    """The completion's ids; the first max_tokens are exact (completions keep their first tokens)."""
    if not isinstance(value, (str, list)):
        raise DataError(f"{where}: {key!r} must be a string or a message list, got {_describe(value)}")
    if messages is None:
        if isinstance(value, list):
            _need_chat_template(tokenizer, where, "message-list completions")
        return _encode(tokenizer, _head_text(tokenizer, value, max_tokens)) + eos
    full = _render(tokenizer, messages + _as_messages(value, "assistant", where, key), False, where)
    if not full.startswith(prompt_text):
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix of prompt + {key}")
    # Up to the end-of-turn token; the newline the template writes after it is never generated.
    return _encode(tokenizer, _head_text(tokenizer, full[len(prompt_text):].rstrip(), max_tokens))


def tokenize_preference(rows, tokenizer, max_seq_length: int, max_prompt_length: int | None = None,
                        source: str = "<rows>") -> tuple[list[PreferenceExample], dict]:
    """Tokenize {"prompt","chosen","rejected"} rows (optional "system").

    Prompts longer than max_prompt_length keep their last tokens (the generation header stays);
    a completion that doesn't fit in max_seq_length next to its prompt keeps its first tokens. A
    pair with no room for a completion token is dropped. Stats: num_examples, num_truncated,
    num_dropped, num_tokens (prompt + chosen + rejected).
    """
    rows = load_rows(rows)
    if source == "<rows>":
        source = rows.source
    bos, eos = _leading_special_ids(tokenizer), _eos_ids(tokenizer)
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows):
        where = rows.where(i) if rows.source == source else f"{source} row {i + 1}"
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing} (keys found: {sorted(row)}); "
                            f"accepted format: {PREFERENCE_FORMAT}")
        prompt_text, prompt_ids, messages = _render_prompt(row, tokenizer, where, bos, row.get("system"),
                                                           max_prompt_length, max_seq_length)
        chosen = _completion_ids(row["chosen"], "chosen", tokenizer, messages, prompt_text, eos, where,
                                 max_seq_length)
        rejected = _completion_ids(row["rejected"], "rejected", tokenizer, messages, prompt_text, eos, where,
                                   max_seq_length)
        was_truncated = False
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids, was_truncated = prompt_ids[-max_prompt_length:], True
        room = max_seq_length - len(prompt_ids)
        if len(chosen) > room or len(rejected) > room:
            chosen, rejected, was_truncated = chosen[:max(room, 0)], rejected[:max(room, 0)], True
        truncated += was_truncated
        if not chosen or not rejected:
            dropped += 1
            continue
        examples.append(PreferenceExample(prompt_ids, chosen, rejected))
    if truncated:
        warnings.warn(f"{source}: {truncated} of {len(rows)} preference pairs were truncated "
                      f"(max_seq_length={max_seq_length}, max_prompt_length={max_prompt_length}); "
                      f"{dropped} dropped with no room for a completion", stacklevel=2)
    if not examples:
        raise DataError(f"{source}: every pair was dropped: prompts leave no room for a completion "
                        f"within max_seq_length={max_seq_length} (set max_prompt_length)")
    stats = {"num_examples": len(examples), "num_truncated": truncated, "num_dropped": dropped,
             "num_tokens": sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)}
    return examples, stats


def tokenize_prompts(rows, tokenizer, max_prompt_length: int | None = None,
                     source: str = "<rows>") -> tuple[list[PromptExample], dict]:
    """Tokenize {"prompt", ...} rows for online algorithms.

    With a chat template, every prompt - a string too, as one user message - is rendered with
    add_generation_prompt=True, so generation starts right after the assistant header (what
    TRL does for conversational prompts; an instruct model expects it for plain ones). Without
    a template, a string prompt is tokenized as it is. Prompts longer than max_prompt_length
    keep their last tokens. Stats: num_examples, num_truncated, num_tokens.
    """
    rows = load_rows(rows)
    if source == "<rows>":
        source = rows.source
    bos = _leading_special_ids(tokenizer)
    examples, truncated = [], 0
    for i, row in enumerate(rows):
        where = rows.where(i) if rows.source == source else f"{source} row {i + 1}"
        if "prompt" not in row:
            raise DataError(f"{where}: missing key 'prompt' (keys found: {sorted(row)}); "
                            f"accepted format: {PROMPT_FORMAT}")
        prompt_text, prompt_ids, _ = _render_prompt(row, tokenizer, where, bos, max_prompt_length=max_prompt_length)
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
            prompt_text = _hf_tokenizer(tokenizer).decode(prompt_ids)
            truncated += 1
        columns = {key: value for key, value in row.items() if key != "prompt"}
        examples.append(PromptExample(prompt_ids, prompt_text, columns, row["prompt"]))
    if truncated:
        warnings.warn(f"{source}: {truncated} of {len(rows)} prompts were longer than "
                      f"max_prompt_length={max_prompt_length} tokens; their first tokens were cut", stacklevel=2)
    stats = {"num_examples": len(examples), "num_truncated": truncated,
             "num_tokens": sum(len(e.prompt_ids) for e in examples)}
    return examples, stats


def load_preference_dataset(data, tokenizer, max_seq_length: int, split: str = "train",
                            max_prompt_length: int | None = None) -> tuple[list[PreferenceExample], dict]:
    rows = load_rows(data, split)
    return tokenize_preference(rows, tokenizer, max_seq_length, max_prompt_length, source=rows.source)


def load_prompt_dataset(data, tokenizer, split: str = "train",
                        max_prompt_length: int | None = None) -> tuple[list[PromptExample], dict]:
    rows = load_rows(data, split)
    return tokenize_prompts(rows, tokenizer, max_prompt_length, source=rows.source)


# ---------------------------------------------------------------------------------------------
# Unpaired rows (KTO)


UNPAIRED_FORMAT = ('{"prompt","completion","label"} (label: true for a desirable completion), or '
                   + PREFERENCE_FORMAT)


@dataclass
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


def tokenize_unpaired(rows, tokenizer, max_length: int, max_prompt_length: int | None = None,
                      source: str = "<rows>") -> tuple[list[UnpairedExample], dict]:
    """Tokenize KTO rows (unpaired, or pairs split in two), truncated as ``tokenize_preference``
    does: long prompts keep their last tokens, long completions their first; an example with no
    room left for a completion token is dropped."""
    rows = load_rows(rows)
    if source == "<rows>":
        source = rows.source
    bos, eos = _leading_special_ids(tokenizer), _eos_ids(tokenizer)
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows):
        where = rows.where(i) if rows.source == source else f"{source} row {i + 1}"
        paired = "chosen" in row or "rejected" in row
        needed = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion", "label")
        missing = [key for key in needed if key not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing} (keys found: {sorted(row)}); "
                            f"accepted formats: {UNPAIRED_FORMAT}")
        prompt_text, prompt_ids, messages = _render_prompt(row, tokenizer, where, bos, row.get("system"),
                                                           max_prompt_length, max_length)
        if paired:
            completions = [(row["chosen"], "chosen", True), (row["rejected"], "rejected", False)]
        else:
            completions = [(row["completion"], "completion", _label(row["label"], where))]
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids, truncated = prompt_ids[-max_prompt_length:], truncated + 1
        room = max_length - len(prompt_ids)
        for value, key, label in completions:
            completion = _completion_ids(value, key, tokenizer, messages, prompt_text, eos, where, max_length)
            if len(completion) > room:
                completion, truncated = completion[:max(room, 0)], truncated + 1
            if not completion:
                dropped += 1
                continue
            examples.append(UnpairedExample(prompt_ids, completion, label))
    if truncated:
        warnings.warn(f"{source}: {truncated} prompts or completions were truncated (max_length={max_length}, "
                      f"max_prompt_length={max_prompt_length}); {dropped} dropped with no room for a completion",
                      stacklevel=2)
    if not examples:
        raise DataError(f"{source}: every example was dropped: prompts leave no room for a completion "
                        f"within max_length={max_length} (set max_prompt_length)")
    stats = {"num_examples": len(examples), "num_desirable": sum(e.label for e in examples),
             "num_truncated": truncated, "num_dropped": dropped,
             "num_tokens": sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples)}
    return examples, stats


def _label(value, where: str) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: 'label' must be true or false (desirable or not), got {value!r}")
