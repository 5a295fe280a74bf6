"""Dataset loading and tokenization, shared by every trainer on both backends.

Data comes in as a .jsonl file, a directory with train/valid/test.jsonl (mlx-lm layout), a list
of dicts, an HF ``Dataset``/``DatasetDict`` (or any mapping of split -> rows), or a hub dataset
id. Rows are read exactly as TRL 1.16 reads them; mlx-lm-lora 5.10.2's own additions (its
``*_feature`` column names, a ``system`` column) are read as mlx-lm-lora reads them. Where the two
read the same row differently (string prompts: TRL uses them as written, mlx-lm-lora wraps them
in the chat template), TRL wins. Each split's detected format goes to stderr in one line, e.g.
``data/train.jsonl: 120 rows, format prompt/completion (strings, as written, no chat template, as TRL)``.

==================================  ===========================================================
Row                                 Read as
==================================  ===========================================================
SFT ``{"text"}``                    the text as written (plus the tokenizer's own BOS, if any);
                                    EOS appended unless the text already ends with it (TRL)
SFT ``{"prompt","completion"}``     strings: ``prompt + completion`` as written, no chat
strings                             template; EOS appended unless present; the completion
                                    starts where the tokens of prompt and prompt + completion
                                    part (TRL)
SFT ``{"prompt","completion"}``     the chat template renders prompt (with the generation
message lists                       prompt) and prompt + completion; the completion is what
                                    follows (TRL)
SFT ``{"messages"}``                the chat template; a ``text`` column beside it is not used
                                    (TRL, mlx-lm-lora)
SFT ``{"conversations"}``           ShareGPT: from/value read as role/content (TRL); roles
                                    human/gpt read as user/assistant (Unsloth's
                                    standardize_sharegpt; TRL keeps them as written)
pairs ``{"prompt","chosen",         strings: as written, EOS appended to chosen/rejected unless
"rejected"}``                       present (TRL); message lists: the chat template (TRL)
pairs ``{"chosen","rejected"}``     implicit prompt: the common beginning of chosen and
                                    rejected (TRL's extract_prompt)
pairs with a string prompt and      maybe_extract_prompt: the prompt is the messages chosen and
message-list chosen/rejected        rejected begin with (TRL); where they share none (assistant
                                    replies only), the prompt is one user message (mlx-lm-lora)
pairs with ``system``               the chat template renders system + user prompt + assistant
                                    reply (mlx-lm-lora's DPODataset; TRL has no system column);
                                    without a chat template: "system\\n\\nprompt"
KTO ``{"prompt","completion",       as pairs (TRL's KTO tokenization); pairs are split into a
"label"}``                          desirable and an undesirable example (TRL's unpairing)
prompts ``{"prompt", ...}``         strings as written, no chat template (TRL's GRPOTrainer);
                                    message lists: chat template + generation prompt; a
                                    ``system`` column reaches reward functions only (TRL)
``preference_score``                mlx-lm-lora's ORPO weighs the chosen log-probs by it; macft
                                    does not: one warning says so
==================================  ===========================================================

Tokens are plain Python ints and batches are numpy arrays, so nothing here imports mlx or torch.
Every bad input raises ``DataError`` with one line that names the file and line (or row), key
or split.

BOS: strings are tokenized as TRL tokenizes them, ``tokenizer(text)``, so they get whatever
special tokens the tokenizer adds by itself (Llama's BOS; nothing for SmolLM2/Qwen); rendered
chat templates are tokenized with ``add_special_tokens=False`` (the template writes BOS itself),
as ``apply_chat_template(tokenize=True)`` does.
"""

import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from macft.distributed import launched_rank


class DataError(ValueError):
    """Bad training data; the message names the file:line, row, key or split."""


SFT_FORMATS = ('{"text"}, {"prompt","completion"}, {"messages":[{"role","content"},...]} '
               'or {"conversations":[{"from","value"},...]}')
PREFERENCE_FORMAT = ('{"prompt","chosen","rejected"} (strings or message lists), optional "system", '
                     'or {"chosen","rejected"} with the prompt implicit in both')
PROMPT_FORMAT = '{"prompt", ...other columns} (prompt a string or a message list)'

# File names that hold each split in a data directory; the first one found wins.
SPLIT_FILES = {
    "train": ("train.jsonl",),
    "valid": ("valid.jsonl", "validation.jsonl", "val.jsonl"),
    "test": ("test.jsonl",),
}
SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid", "eval": "valid"}

# ShareGPT role names, as Unsloth's standardize_sharegpt reads them; other roles stay as written.
SHAREGPT_ROLES = {"human": "user", "input": "user", "gpt": "assistant", "output": "assistant"}

# mlx-lm-lora's settings that rename a column, by the name macft reads (for error messages).
FEATURE_SETTINGS = {"text": "text_feature", "messages": "chat_feature", "prompt": "prompt_feature",
                    "completion": "completion_feature", "system": "system_feature", "chosen": "chosen_feature",
                    "rejected": "rejected_feature", "preference_score": "preference_score_feature",
                    "type": "type_feature", "answer": "answer_feature"}


# ---------------------------------------------------------------------------------------------
# Loading rows


class Rows(list):
    """A list of row dicts that remembers where it came from, so that errors raised while
    tokenizing can name the file and line (blank lines make row index and line number differ)."""

    def __init__(self, rows, source: str, line_numbers: list[int] | None = None, columns: dict | None = None):
        super().__init__(rows)
        self.source = source
        self.line_numbers = line_numbers
        self.columns = columns  # the column renaming already applied (see rename_columns)

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


def load_rows(data, split: str = "train", columns: dict[str, str] | None = None, strings_as_chat: bool = False,
              default_system: str | None = None) -> list[dict]:
    """The rows of one split of `data`, as a list of dicts (a ``Rows`` that knows its source).

    `data`: a .jsonl file, a directory holding train.jsonl / valid.jsonl (or validation.jsonl,
    val.jsonl) / test.jsonl, a list of dicts, an HF Dataset, a DatasetDict or other mapping of
    split -> rows, or a hub dataset id. A single file, list or Dataset is returned whatever
    `split` asks for (the caller named that data explicitly); ``has_split`` reports it as
    "train" only, so trainers don't evaluate on their training data by accident.

    `columns` renames the dataset's own columns to the names macft reads (canonical name -> the
    dataset's column, e.g. ``{"prompt": "question"}``), as mlx-lm-lora's ``*_feature`` settings do.
    `strings_as_chat` and `default_system`: mlx-lm-lora's reading of string rows
    (``strings_as_chat_turns``), which its command line users expect; TRL reads them as written.
    """
    rows = rename_columns(_load_rows(data, split), columns)
    return strings_as_chat_turns(rows, default_system) if strings_as_chat else rows


def _load_rows(data, split: str) -> Rows:
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
# Column names


def _check_columns(columns) -> dict:
    """`columns` as a dict of the renamings that change something; a wrong type is an error."""
    if columns is None:
        return {}
    if not isinstance(columns, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in columns.items()):
        raise DataError(f"dataset_columns must map column names to column names (e.g. {{'prompt': 'question'}}), "
                        f"got {columns!r}")
    return {canonical: name for canonical, name in columns.items() if canonical != name}


def _column_setting(canonical: str, name: str) -> str:
    """How the user named the column: macft's dataset_columns, or mlx-lm-lora's *_feature key."""
    feature = FEATURE_SETTINGS.get(canonical)
    mlx = f" / {feature}: {name}" if feature else ""
    return f"dataset_columns {{{canonical!r}: {name!r}}}{mlx}"


def rename_columns(rows: Rows, columns: dict[str, str] | None) -> Rows:
    """The rows with the dataset's own column names replaced by the names macft reads
    (``{"prompt": "question"}``: the "question" column is read as the prompt), as mlx-lm-lora's
    ``*_feature`` settings do. A row without a named column is an error. Renaming rows twice with
    the same mapping renames them once (a trainer may pass `columns` to both load_rows and a
    tokenize function)."""
    columns = _check_columns(columns)
    if not columns or rows.columns == columns:
        return rows
    renamed = []
    for index, row in enumerate(rows):
        row = dict(row)
        for canonical, name in columns.items():
            if name not in row:
                raise DataError(f"{rows.where(index)}: no column {name!r}, which {_column_setting(canonical, name)} "
                                f"reads as {canonical!r} (keys found: {sorted(row)})")
        # Pop every named column first, so that swapping two names works.
        values = {canonical: row.pop(name) for canonical, name in columns.items()}
        row.update(values)
        renamed.append(row)
    return Rows(renamed, rows.source, rows.line_numbers, columns)


# mlx-lm-lora's GRPODataset puts this system turn before a prompt whose row has no system column;
# its r1_* reward functions look for the <think>/<answer> layout it asks for.
MLX_LM_LORA_GRPO_SYSTEM = ("You are given a problem. Think about the problem and provide your working out. Place "
                           "it between <think> and </think>. Then, provide your solution between <answer> </answer>.")

_ASSISTANT_KEYS = ("completion", "chosen", "rejected")
PROMPT_AS_GIVEN = "_prompt_as_given"  # the string a prompt row had before strings_as_chat_turns


def strings_as_chat_turns(rows: Rows, default_system: str | None = None) -> Rows:
    """mlx-lm-lora's reading of string rows: a string prompt is a user turn (after the row's
    ``system`` turn, or `default_system`'s), and a string completion / chosen / rejected is the
    assistant's reply, so that the chat template renders them (its CompletionsDataset, DPODataset,
    PromptDataset, GRPODataset). TRL, whose reading is the default, uses strings as written.
    ``text`` and ``messages`` rows are the same in both."""
    turned = []
    for row in rows:
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            row = dict(row)
            system = row.get("system") if isinstance(row.get("system"), str) else default_system
            row["prompt"] = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            row[PROMPT_AS_GIVEN] = prompt  # reward functions get the string, as in mlx-lm-lora
            for key in _ASSISTANT_KEYS:
                if isinstance(row.get(key), str):
                    row[key] = [{"role": "assistant", "content": row[key]}]
        turned.append(row)
    return Rows(turned, rows.source, rows.line_numbers, rows.columns)


# ---------------------------------------------------------------------------------------------
# Saying which format was read

# What each detected format means, for the one line per split on stderr.
FORMAT_DESCRIPTIONS = {
    "text": "text (as written, EOS appended unless present, as TRL)",
    "prompt/completion strings": "prompt/completion (strings, as written, no chat template, EOS appended "
                                 "unless present, as TRL)",
    "prompt/completion messages": "prompt/completion (message lists, chat template, as TRL)",
    "messages": "messages (chat template, as TRL)",
    "messages+text": "messages (chat template; the 'text' column is not used, as TRL)",
    "sharegpt": "ShareGPT conversations (from/value read as role/content, as TRL; roles human/gpt read as "
                "user/assistant, as Unsloth's standardize_sharegpt; TRL keeps them as written)",
    "pairs strings": "prompt/chosen/rejected (strings, as written, no chat template, EOS appended unless "
                     "present, as TRL)",
    "pairs messages": "prompt/chosen/rejected (message lists, chat template, as TRL)",
    "pairs implicit strings": "chosen/rejected with an implicit prompt (strings; the prompt is their common "
                              "beginning, as TRL's extract_prompt)",
    "pairs implicit messages": "chosen/rejected with an implicit prompt (message lists; the prompt is the "
                               "messages both begin with, as TRL's extract_prompt)",
    "pairs extracted": "string prompt with message-list chosen/rejected (the prompt is the messages both "
                       "begin with, as TRL's maybe_extract_prompt; the 'prompt' column is not used)",
    "pairs user prompt": "string prompt with assistant-message chosen/rejected (the prompt read as one user "
                         "message, as mlx-lm-lora)",
    "pairs system": "prompt/chosen/rejected with system (chat template: system + user prompt + assistant "
                    "reply, as mlx-lm-lora)",
    "pairs system plain": "prompt/chosen/rejected with system and no chat template (system, a blank line, "
                          "then the prompt)",
    "unpaired strings": "prompt/completion/label (strings, as written, no chat template, EOS appended unless "
                        "present, as TRL)",
    "unpaired messages": "prompt/completion/label (message lists, chat template, as TRL)",
    "prompt string": "prompt (string, as written, no chat template, as TRL)",
    "prompt messages": "prompt (message list, chat template with the generation prompt, as TRL)",
}

_last_format_line = None


def _report_formats(source: str, formats: list[str], notes: tuple = ()):
    """One line on stderr: the split's rows and format(s), as macft's progress goes to stderr.
    The same line twice in a row is printed once (the reward trainer tokenizes row by row)."""
    global _last_format_line
    counts = {}
    for name in formats:
        counts[name] = counts.get(name, 0) + 1
    if len(counts) == 1:
        described = f"format {FORMAT_DESCRIPTIONS[formats[0]]}"
    else:
        described = "formats " + "; ".join(f"{FORMAT_DESCRIPTIONS[name]}: {count} rows"
                                           for name, count in counts.items())
    line = f"{source}: {len(formats)} rows, {described}" + "".join(f"; {note}" for note in notes)
    if line != _last_format_line and launched_rank() == 0:
        print(line, file=sys.stderr, flush=True)
        _last_format_line = line
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


def _encode_text(tokenizer, text: str) -> list[int]:
    """A plain string's ids as TRL tokenizes it, ``tokenizer(text)``: with the special tokens the
    tokenizer adds by itself (Llama's BOS)."""
    return list(_hf_tokenizer(tokenizer)(text)["input_ids"])


def _eos_token(tokenizer) -> str | None:
    return getattr(_hf_tokenizer(tokenizer), "eos_token", None) or getattr(tokenizer, "eos_token", None)


def _with_eos(text: str, eos: str | None) -> str:
    """TRL's rule: the EOS token (as text) is appended unless the text already ends with it."""
    return text if not eos or text.endswith(eos) else text + eos


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    length = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        length += 1
    return length


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


def _is_message_list(value) -> bool:
    """TRL's is_conversational test on one value: a list whose first item is a dict with a role
    (or, ShareGPT, a "from")."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and ("role" in value[0] or "from" in value[0]))


def _messages(value, where: str, key: str) -> list[dict]:
    """Validate a message list (or read a ShareGPT one) into [{"role", "content", ...}]."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages, got {_describe(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if "role" not in message and "from" in message:  # ShareGPT
            rest = {k: v for k, v in message.items() if k not in ("from", "value")}
            message = {"role": SHAREGPT_ROLES.get(message["from"], message["from"]),
                       "content": message.get("value"), **rest}
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise DataError(f"{where}: {key}[{i}] has no 'role' string (keys: {sorted(message)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}] ({role}) 'content' must be a string, got {_describe(content)}")
        messages.append(message)
    return messages


def _describe(value) -> str:
    return "nothing" if value is None else type(value).__name__


def _string(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {_describe(value)}")
    return value


def _prompt_part(tokenizer, text: str, max_prompt_length: int | None, max_length: int | None) -> str:
    """The part of a prompt's text worth tokenizing: prompts keep their last max_prompt_length
    tokens; with no such limit, only whether the prompt is longer than max_length matters."""
    if max_prompt_length is not None:
        return _tail_text(tokenizer, text, max_prompt_length)
    if max_length is not None:
        return _head_text(tokenizer, text, max_length)
    return text


def _split_ids(tokenizer, prompt: str, completions: list[str], plain: bool, max_prompt_length: int | None,
               max_length: int) -> tuple[list[int], list[list[int]]]:
    """TRL's tokenization of a prompt and its completions: the prompt and each prompt + completion
    are tokenized whole, and the completion starts where the prompt's ids and the joined ids part
    (``common_prefix_length``; usually the prompt's end, earlier where a token merges across it).

    plain: strings, tokenized as ``tokenizer(text)``; else rendered chat text (no special tokens
    added). A text far longer than can be kept is cut first (``_tail_text``, ``_head_text``), far
    enough from the prompt/completion boundary that the ids kept are the same."""
    encode = _encode_text if plain else _encode
    prompt = _prompt_part(tokenizer, prompt, max_prompt_length, max_length)
    prompt_ids = encode(tokenizer, prompt)
    joined = [encode(tokenizer, prompt + _head_text(tokenizer, completion, max_length)) for completion in completions]
    length = min(_common_prefix_length(prompt_ids, ids) for ids in joined)
    return prompt_ids[:length], [ids[length:] for ids in joined]


def _split_rendered(tokenizer, prompt_messages: list[dict], completions: list[list[dict]], where: str,
                    max_prompt_length: int | None, max_length: int) -> tuple[list[int], list[list[int]]]:
    """``_split_ids`` for a conversation: the prompt rendered with the generation prompt, each
    prompt + completion rendered whole (TRL). A template whose prompt is not a prefix of the whole
    conversation (a generation prompt the conversation drops) is tokenized uncut."""
    prompt_text = _render(tokenizer, prompt_messages, True, where)
    fulls = [_render(tokenizer, prompt_messages + completion, False, where) for completion in completions]
    if all(full.startswith(prompt_text) for full in fulls):
        return _split_ids(tokenizer, prompt_text, [full[len(prompt_text):] for full in fulls], False,
                          max_prompt_length, max_length)
    prompt_ids = _encode(tokenizer, prompt_text)
    joined = [_encode(tokenizer, full) for full in fulls]
    length = min(_common_prefix_length(prompt_ids, ids) for ids in joined)
    return prompt_ids[:length], [ids[length:] for ids in joined]


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


def _assistant_spans(tokenizer, messages: list[dict], full: str, where: str):
    """Character spans of the assistant turns in the rendered conversation: from the end of the
    template's generation prompt for that turn to the end of the turn as the template writes it
    (end-of-turn token and the newline after it), which is what TRL counts as a completion.

    The start is where the template's generation prompt for that turn ends; the end is where the
    conversation rendered up to that turn ends. Templates that render a turn differently once it
    is no longer the last one (Qwen3 drops empty <think> blocks from history) fail the prefix
    check; then the turn's content is located in the full text and extended over what the
    template wrote after it.
    """
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = _render(tokenizer, messages[:i], True, where) if i > 0 else None
        upto = _render(tokenizer, messages[:i + 1], False, where)
        if header is not None and upto.startswith(header) and full.startswith(upto):
            start, end = len(header), len(upto)
        else:
            content = message["content"]
            header_ok = header is not None and full.startswith(header)
            content_at = full.find(content, max(cursor, len(header) if header_ok else 0))
            if content_at < 0:
                raise DataError(f"{where}: cannot find assistant message {i} in the rendered chat template")
            start = len(header) if header_ok else content_at
            end = content_at + len(content)
            after_content = upto[upto.rfind(content) + len(content):] if content else ""
            for end_of_turn in (after_content, after_content.strip()):
                if end_of_turn and full.startswith(end_of_turn, end):
                    end += len(end_of_turn)
                    break
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    return spans


def _sft_format(row: dict) -> str | None:
    """The row's format, in the order TRL and mlx-lm-lora look: prompt/completion first, then
    messages (a "text" column beside them is not used), then text."""
    if "prompt" in row and "completion" in row:
        conversational = _is_message_list(row["prompt"]) or _is_message_list(row["completion"])
        return "prompt/completion messages" if conversational else "prompt/completion strings"
    if "messages" in row:
        return "messages+text" if "text" in row else "messages"
    if "conversations" in row:
        return "sharegpt"
    if "text" in row:
        return "text"
    return None


def _tokenize_sft_row(row: dict, form: str, tokenizer, train_on_prompt: bool, where: str,
                      max_tokens: int) -> tuple[list[int], list[int]]:
    """The row's ids and loss mask; at least its first max_tokens ids are exact (see
    ``_head_text``): tokenize_sft keeps the first max_seq_length."""
    if form in ("messages", "messages+text", "sharegpt"):
        key = "conversations" if form == "sharegpt" else "messages"
        messages = _messages(row[key], where, key)
        _need_chat_template(tokenizer, where, f"{key!r} rows")
        full = _render(tokenizer, messages, False, where)
        spans = [(0, len(full))] if train_on_prompt else _assistant_spans(tokenizer, messages, full, where)
        return _char_spans_to_mask(tokenizer, full, spans, max_tokens)
    if form == "prompt/completion messages":
        prompt = _messages(row["prompt"], where, "prompt")
        completion = _messages(row["completion"], where, "completion")
        _need_chat_template(tokenizer, where, "message-list prompts/completions")
        prompt_ids, (completion_ids,) = _split_rendered(tokenizer, prompt, [completion], where, None, max_tokens)
    elif form == "prompt/completion strings":
        completion = _with_eos(_string(row, "completion", where), _eos_token(tokenizer))
        prompt_ids, (completion_ids,) = _split_ids(tokenizer, _string(row, "prompt", where), [completion], True,
                                                   None, max_tokens)
    else:  # text: every token is a target (TRL: labels = input_ids)
        text = _with_eos(_string(row, "text", where), _eos_token(tokenizer))
        ids = _encode_text(tokenizer, _head_text(tokenizer, text, max_tokens))
        return ids, [1] * len(ids)
    # TRL's completion_only_loss (its default for prompt/completion rows): the prompt is no target.
    return prompt_ids + completion_ids, [int(train_on_prompt)] * len(prompt_ids) + [1] * len(completion_ids)


def _check_sft_row(row: dict, form: str | None, where: str):
    if form is None:
        raise DataError(f"{where}: no SFT format matches the keys {sorted(row)}; accepted formats: {SFT_FORMATS}")
    if form == "prompt/completion messages":
        for key in ("prompt", "completion"):
            if not _is_message_list(row[key]):
                # TRL reads neither mixture, and mlx-lm-lora would put the list into a message's content.
                raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists, "
                                f"got {_describe_value(row['prompt'])} and {_describe_value(row['completion'])}")


def _describe_value(value) -> str:
    return "a message list" if _is_message_list(value) else f"a {_describe(value)}" if value is not None else "nothing"


def tokenize_sft(rows, tokenizer, max_seq_length: int, train_on_prompt: bool = False,
                 source: str = "<rows>", columns: dict[str, str] | None = None) -> tuple[list[Example], dict]:
    """Tokenize SFT rows into Examples with loss masks, truncated to max_seq_length.

    Rows are read as TRL's SFTTrainer reads them (module docstring). Loss falls on completion /
    assistant tokens (each assistant turn from after its generation prompt to the end of the turn
    as the template writes it) unless train_on_prompt; on every token of "text" rows. A sample
    left with no target token (after truncation, or with no assistant turn) is dropped. Returns
    (examples, stats) with num_examples, num_truncated, num_dropped, num_tokens, num_target_tokens.
    """
    rows = load_rows(rows, columns=columns)
    if source == "<rows>":
        source = rows.source
    examples, formats, truncated, dropped = [], [], 0, 0
    for i, row in enumerate(rows):
        where = rows.where(i) if rows.source == source else f"{source} row {i + 1}"
        form = _sft_format(row)
        _check_sft_row(row, form, where)
        formats.append(form)
        ids, mask = _tokenize_sft_row(row, form, tokenizer, train_on_prompt, where, max_seq_length)
        if len(ids) > max_seq_length:
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
            truncated += 1
        if mask:
            mask[0] = 0  # nothing comes before the first token to predict it from
        if not any(mask):
            dropped += 1
            continue
        examples.append(Example(ids, mask))
    _report_formats(source, formats)
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
                     train_on_prompt: bool = False, columns: dict[str, str] | None = None,
                     strings_as_chat: bool = False) -> tuple[list[Example], dict]:
    rows = load_rows(data, split, columns, strings_as_chat)
    return tokenize_sft(rows, tokenizer, max_seq_length, train_on_prompt, source=rows.source, columns=columns)


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
    """prompt_ids end with the assistant generation header for chat rows; chosen_ids /
    rejected_ids are completion tokens including EOS / the end of the turn."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class PromptExample:
    """prompt_text is what the model sees (the string as written, or the rendered chat template);
    prompt is the row's prompt as given (string or messages), which TRL-style reward functions
    receive as `prompts`; columns are the row's other columns, passed to reward functions as
    keyword arguments."""

    prompt_ids: list[int]
    prompt_text: str
    columns: dict = field(default_factory=dict)
    prompt: object = None


def _extract_prompt(chosen, rejected, where: str):
    """TRL's extract_prompt: the prompt is the longest common beginning of chosen and rejected
    (characters of strings, messages of message lists); the completions are what follows."""
    shortest = min(len(chosen), len(rejected))
    if shortest == 0:
        raise DataError(f"{where}: 'chosen' or 'rejected' is empty, so no prompt can be extracted from them")
    index = shortest - 1  # where TRL's loop stops when neither differs within the shorter one
    for i in range(shortest):
        if chosen[i] != rejected[i]:
            index = i
            # TRL leaves a space that ends the common part to the completions. (At i == 0 its index
            # wraps around to the last character; that slip is not copied.)
            if i > 0 and chosen[i - 1] == " ":
                index = i - 1
            break
    return chosen[:index], [chosen[index:], rejected[index:]]


def _read_prompted(row: dict, keys: tuple, tokenizer, where: str):
    """How a pair (keys chosen, rejected) or an unpaired row (key completion) is read: (format,
    plain, prompt, completions), plain meaning strings tokenized as written, else message lists
    rendered by the chat template. See the module docstring for the rules and whose they are."""
    completions = [row[key] for key in keys]
    for key, value in zip(keys, completions):
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: {key!r} must be a string or a message list, got {_describe(value)}")
    conversational = [_is_message_list(value) for value in completions]
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string, got {_describe(system)}")
    if any(conversational) and not all(conversational):
        raise DataError(f"{where}: {' and '.join(repr(k) for k in keys)} must all be strings or all message lists")
    if "prompt" not in row:  # TRL's implicit prompt
        prompt, completions = _extract_prompt(*completions, where)
        if all(conversational):
            if not prompt:
                raise DataError(f"{where}: 'chosen' and 'rejected' begin with no common message, so there is no "
                                "prompt (give a 'prompt' column)")
            return "pairs implicit messages", False, _with_system(prompt, system), [_messages(c, where, k) for c, k
                                                                                     in zip(completions, keys)]
        if system is not None:
            raise DataError(f"{where}: a 'system' column needs a 'prompt' column (the pairs' prompt is implicit)")
        return "pairs implicit strings", True, prompt, completions
    prompt = row["prompt"]
    if not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: 'prompt' must be a string or a message list, got {_describe(prompt)}")
    if isinstance(prompt, list):
        if not all(conversational):
            # TRL's trainers cannot join a message list and a string; mlx-lm-lora would put the list into content.
            raise DataError(f"{where}: a message-list 'prompt' needs message-list {' and '.join(repr(k) for k in keys)}"
                            ", got strings")
        return ("pairs messages", False, _with_system(_messages(prompt, where, "prompt"), system),
                [_messages(c, where, k) for c, k in zip(completions, keys)])
    if all(conversational):
        completions = [_messages(c, where, k) for c, k in zip(completions, keys)]
        if len(completions) == 2:  # TRL's maybe_extract_prompt: the prompt is inside chosen and rejected
            extracted, rest = _extract_prompt(*completions, where)
            if extracted:
                return "pairs extracted", False, _with_system(extracted, system), rest
        user = [{"role": "user", "content": prompt}]
        return "pairs user prompt", False, _with_system(user, system), completions
    if system is None:
        return "pairs strings", True, prompt, completions
    if has_chat_template(tokenizer):  # mlx-lm-lora's DPODataset / ORPODataset
        return ("pairs system", False, [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                [[{"role": "assistant", "content": c}] for c in completions])
    return "pairs system plain", True, f"{system}\n\n{prompt}", completions


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}] + messages


def _tokenize_prompted(tokenizer, plain: bool, prompt, completions: list, where: str,
                       max_prompt_length: int | None, max_length: int):
    """(prompt ids, [completion ids]) as TRL's DPO / KTO tokenization makes them; the last
    max_prompt_length prompt ids and the first max_length completion ids are exact."""
    if plain:
        eos = _eos_token(tokenizer)
        return _split_ids(tokenizer, prompt, [_with_eos(c, eos) for c in completions], True,
                          max_prompt_length, max_length)
    _need_chat_template(tokenizer, where, "message-list rows (and a 'system' column)")
    return _split_rendered(tokenizer, prompt, completions, where, max_prompt_length, max_length)


def _warn_preference_score(rows, source: str):
    if any("preference_score" in row for row in rows):
        warnings.warn(f"{source}: the 'preference_score' column is not used: mlx-lm-lora's ORPO weighs each pair's "
                      "chosen log-probabilities by it, macft's trainers weigh every pair the same", stacklevel=3)


def tokenize_preference(rows, tokenizer, max_seq_length: int, max_prompt_length: int | None = None,
                        source: str = "<rows>", columns: dict[str, str] | None = None
                        ) -> tuple[list[PreferenceExample], dict]:
    """Tokenize preference pairs: {"prompt","chosen","rejected"}, optional "system", or
    {"chosen","rejected"} with an implicit prompt, read as TRL's DPOTrainer reads them.

    Prompts longer than max_prompt_length keep their last tokens (the generation header stays);
    a completion that doesn't fit in max_seq_length next to its prompt keeps its first tokens. A
    pair with no room for a completion token is dropped. Stats: num_examples, num_truncated,
    num_dropped, num_tokens (prompt + chosen + rejected).
    """
    rows = load_rows(rows, columns=columns)
    if source == "<rows>":
        source = rows.source
    examples, formats, truncated, dropped = [], [], 0, 0
    for i, row in enumerate(rows):
        where = rows.where(i) if rows.source == source else f"{source} row {i + 1}"
        missing = [key for key in ("chosen", "rejected") if key not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing} (keys found: {sorted(row)}); "
                            f"accepted format: {PREFERENCE_FORMAT}")
        form, plain, prompt, completions = _read_prompted(row, ("chosen", "rejected"), tokenizer, where)
        formats.append(form)
        prompt_ids, (chosen, rejected) = _tokenize_prompted(tokenizer, plain, prompt, completions, where,
                                                            max_prompt_length, max_seq_length)
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
    _report_formats(source, formats)
    _warn_preference_score(rows, source)
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


def _prompt_ids(row: dict, tokenizer, where: str, max_prompt_length: int | None) -> tuple[str, str, list[int]]:
    """(format, text, ids) of a prompt row: a string as written (TRL's GRPOTrainer tokenizes it
    with ``tokenizer(prompt)``), a message list rendered with the generation prompt. A prompt far
    longer than max_prompt_length is cut first (its last max_prompt_length ids stay exact)."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return "prompt string", prompt, _encode_text(tokenizer, _prompt_part(tokenizer, prompt, max_prompt_length,
                                                                             None))
    if not isinstance(prompt, list):
        raise DataError(f"{where}: 'prompt' must be a string or a message list, got {_describe(prompt)}")
    messages = _messages(prompt, where, "prompt")
    _need_chat_template(tokenizer, where, "message-list prompts")
    text = _render(tokenizer, messages, True, where)
    return "prompt messages", text, _encode(tokenizer, _prompt_part(tokenizer, text, max_prompt_length, None))


def tokenize_prompts(rows, tokenizer, max_prompt_length: int | None = None, source: str = "<rows>",
                     columns: dict[str, str] | None = None) -> tuple[list[PromptExample], dict]:
    """Tokenize {"prompt", ...} rows for online algorithms, as TRL's GRPOTrainer does: a string
    prompt as written (no chat template), a message list rendered with add_generation_prompt=True
    so generation starts right after the assistant header. Prompts longer than max_prompt_length
    keep their last tokens. Stats: num_examples, num_truncated, num_tokens.
    """
    rows = load_rows(rows, columns=columns)
    if source == "<rows>":
        source = rows.source
    examples, formats, truncated = [], [], 0
    for i, row in enumerate(rows):
        where = rows.where(i) if rows.source == source else f"{source} row {i + 1}"
        if "prompt" not in row:
            raise DataError(f"{where}: missing key 'prompt' (keys found: {sorted(row)}); "
                            f"accepted format: {PROMPT_FORMAT}")
        form, prompt_text, prompt_ids = _prompt_ids(row, tokenizer, where, max_prompt_length)
        formats.append(form)
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
            prompt_text = _hf_tokenizer(tokenizer).decode(prompt_ids)
            truncated += 1
        columns_left = {key: value for key, value in row.items() if key not in ("prompt", PROMPT_AS_GIVEN)}
        examples.append(PromptExample(prompt_ids, prompt_text, columns_left, row.get(PROMPT_AS_GIVEN, row["prompt"])))
    notes = ("the 'system' column reaches reward functions only, not the prompt (as TRL)",) \
        if any("system" in row for row in rows) else ()
    _report_formats(source, formats, notes)
    if truncated:
        warnings.warn(f"{source}: {truncated} of {len(rows)} prompts were longer than "
                      f"max_prompt_length={max_prompt_length} tokens; their first tokens were cut", stacklevel=2)
    stats = {"num_examples": len(examples), "num_truncated": truncated,
             "num_tokens": sum(len(e.prompt_ids) for e in examples)}
    return examples, stats


def load_preference_dataset(data, tokenizer, max_seq_length: int, split: str = "train",
                            max_prompt_length: int | None = None, columns: dict[str, str] | None = None,
                            strings_as_chat: bool = False) -> tuple[list[PreferenceExample], dict]:
    rows = load_rows(data, split, columns, strings_as_chat)
    return tokenize_preference(rows, tokenizer, max_seq_length, max_prompt_length, source=rows.source,
                               columns=columns)


def load_prompt_dataset(data, tokenizer, split: str = "train", max_prompt_length: int | None = None,
                        columns: dict[str, str] | None = None, strings_as_chat: bool = False,
                        default_system: str | None = None) -> tuple[list[PromptExample], dict]:
    rows = load_rows(data, split, columns, strings_as_chat, default_system)
    return tokenize_prompts(rows, tokenizer, max_prompt_length, source=rows.source, columns=columns)


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
                      source: str = "<rows>", columns: dict[str, str] | None = None
                      ) -> tuple[list[UnpairedExample], dict]:
    """Tokenize KTO rows as TRL's KTOTrainer does: {"prompt","completion","label"}, or pairs (an
    implicit prompt too), each split into a desirable and an undesirable example. Truncated as
    ``tokenize_preference`` does: long prompts keep their last tokens, long completions their
    first; an example with no room left for a completion token is dropped."""
    rows = load_rows(rows, columns=columns)
    if source == "<rows>":
        source = rows.source
    examples, formats, truncated, dropped = [], [], 0, 0
    for i, row in enumerate(rows):
        where = rows.where(i) if rows.source == source else f"{source} row {i + 1}"
        paired = "chosen" in row or "rejected" in row
        needed = ("chosen", "rejected") if paired else ("prompt", "completion", "label")
        missing = [key for key in needed if key not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing} (keys found: {sorted(row)}); "
                            f"accepted formats: {UNPAIRED_FORMAT}")
        keys = ("chosen", "rejected") if paired else ("completion",)
        labels = [True, False] if paired else [_label(row["label"], where)]
        form, plain, prompt, completions = _read_prompted(row, keys, tokenizer, where)
        formats.append(form if paired else {"pairs strings": "unpaired strings",
                                            "pairs messages": "unpaired messages"}.get(form, form))
        prompt_cut = False
        for completion, label in zip(completions, labels):
            # One at a time: TRL unpairs a pair first, then tokenizes each half on its own.
            prompt_ids, (completion,) = _tokenize_prompted(tokenizer, plain, prompt, [completion], where,
                                                           max_prompt_length, max_length)
            if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
                prompt_ids, prompt_cut = prompt_ids[-max_prompt_length:], True
            room = max_length - len(prompt_ids)
            if len(completion) > room:
                completion, truncated = completion[:max(room, 0)], truncated + 1
            if not completion:
                dropped += 1
                continue
            examples.append(UnpairedExample(prompt_ids, completion, label))
        truncated += prompt_cut
    _report_formats(source, formats)
    _warn_preference_score(rows, source)
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
