"""``unsloth.chat_templates`` for macft: chat templates by name, ShareGPT conversion, and
response-only loss masks.

    from macft.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only

Every template here is written from the model family's published prompt format and renders
system / user / assistant conversations to the same text as the family's own tokenizer template
(tests/test_chat_templates.py compares them). Tool calls are not rendered; use the model's own
template for those.

Nothing here imports mlx or torch.
"""

import json
import random
import re
import warnings
from dataclasses import dataclass

from macft.data import DataError, _encode, _hf_tokenizer


# ---------------------------------------------------------------------------------------------
# Templates
#
# The bodies assume messages with "role" and "content"; get_chat_template puts a preamble in
# front that maps other keys/role names (ShareGPT) and adds a default system message. Literal
# newlines appear only inside quoted strings: transformers renders with trim_blocks, which would
# eat a newline written after a tag.


@dataclass(frozen=True)
class ChatTemplate:
    jinja: str
    stop_word: str  # the token that ends an assistant turn; "eos_token" means the tokenizer's EOS
    instruction_part: str  # what starts a user turn (train_on_responses_only's default)
    response_part: str  # what starts an assistant turn
    default_system_message: str | None = None


# <|im_start|>role\n content <|im_end|>\n (OpenAI's ChatML; SmolLM2, Qwen, Hermes, ...).
_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Qwen2.5: ChatML, plus consecutive tool results grouped into one user turn.
_QWEN25 = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Qwen3: ChatML where assistant turns after the last user query carry their reasoning in a
# <think> block (the final one always, empty when there is none); earlier turns drop it.
_QWEN3 = (
    "{%- set ns = namespace(last_query=messages|length - 1) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' and not (message['content'].startswith('<tool_response>')"
    " and message['content'].endswith('</tool_response>')) %}"
    "{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- set reasoning = '' %}"
    "{%- if message['reasoning_content'] is string %}"
    "{%- set reasoning = message['reasoning_content'] %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

# Llama 3: BOS, then <|start_header_id|>role<|end_header_id|>\n\n content(trimmed) <|eot_id|>.
_LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# Llama 3.1 / 3.2 / 3.3: as Llama 3, but the system turn is always there and starts with the
# knowledge cutoff and today's date (date_string=..., Meta's template defaults to 26 Jul 2024);
# tool results come back as the ipython role.
_LLAMA31 = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: '"
    " + date_string + '\n\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] in ('tool', 'ipython') %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# For families without a system role (Gemma, Mistral): a system message opens the first user
# turn (first_user_prefix), and the other turns must alternate user/assistant.
_SYSTEM_INTO_FIRST_USER = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
)

# Gemma 1/2/3: BOS, <start_of_turn>user|model\n content(trimmed) <end_of_turn>\n; turns must
# alternate. A system message opens the first user turn (Gemma 3's rule; Gemma 1/2's own
# template refuses system messages). List contents (Gemma 3 multimodal) keep their text parts.
_GEMMA = (
    "{{- bos_token }}"
    + _SYSTEM_INTO_FIRST_USER +
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)

# Phi-3 / Phi-3.5: <|role|>\n content <|end|>\n; an empty system message is left out; a
# finished conversation ends with EOS.
_PHI3 = (
    "{%- for message in messages %}"
    "{%- if message['role'] in ('user', 'assistant') or (message['role'] == 'system' and message['content']) %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

# Phi-4: <|im_start|>role<|im_sep|> content <|im_end|>, no newlines.
_PHI4 = (
    "{%- for message in messages %}"
    "{%- if message['role'] in ('system', 'user', 'assistant') %}"
    "{{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"
)

# Mistral Instruct: BOS [INST] user [/INST]assistant</s>[INST] ... ; Mistral has no system
# role, so a system message opens the first user message.
_MISTRAL = (
    "{{- bos_token }}"
    + _SYSTEM_INTO_FIRST_USER +
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (first_user_prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Zephyr: <|role|>\n content </s>\n (no BOS in the template).
_ZEPHYR = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)

# Stanford Alpaca's prompt, made multi-turn: system\n\n### Instruction:\n...\n\n### Response:\n...</s>\n\n
_ALPACA = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"
)

# Vicuna v1.1 (FastChat): system USER: ... ASSISTANT: ...</s>USER: ... ASSISTANT:
_VICUNA = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + ' ' }}"
    "{%- elif message['role'] == 'user' %}{{- 'USER: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' %}{{- 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"
)

_CHATML_PARTS = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_LLAMA3_PARTS = ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n")
_GEMMA_PARTS = ("<start_of_turn>user\n", "<start_of_turn>model\n")

CHAT_TEMPLATES = {
    "chatml": ChatTemplate(_CHATML, "<|im_end|>", *_CHATML_PARTS),
    "qwen-2.5": ChatTemplate(_QWEN25, "<|im_end|>", *_CHATML_PARTS,
                             default_system_message="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen-3": ChatTemplate(_QWEN3, "<|im_end|>", *_CHATML_PARTS),
    "llama-3": ChatTemplate(_LLAMA3, "<|eot_id|>", *_LLAMA3_PARTS),
    "llama-3.1": ChatTemplate(_LLAMA31, "<|eot_id|>", *_LLAMA3_PARTS),
    "gemma": ChatTemplate(_GEMMA, "<end_of_turn>", *_GEMMA_PARTS),
    "phi-3": ChatTemplate(_PHI3, "<|end|>", "<|user|>\n", "<|assistant|>\n"),
    "phi-4": ChatTemplate(_PHI4, "<|im_end|>", "<|im_start|>user<|im_sep|>", "<|im_start|>assistant<|im_sep|>"),
    "mistral": ChatTemplate(_MISTRAL, "eos_token", "[INST]", "[/INST]"),
    "zephyr": ChatTemplate(_ZEPHYR, "eos_token", "<|user|>\n", "<|assistant|>\n"),
    "alpaca": ChatTemplate(_ALPACA, "eos_token", "### Instruction:\n", "### Response:\n",
                           default_system_message="Below is an instruction that describes a task. "
                                                  "Write a response that appropriately completes the request."),
    "vicuna": ChatTemplate(_VICUNA, "eos_token", "USER: ", "ASSISTANT:",
                           default_system_message="A chat between a curious user and an artificial intelligence "
                                                  "assistant. The assistant gives helpful, detailed, and polite "
                                                  "answers to the user's questions."),
}

# Other names Unsloth's notebooks (and mlx-tune) use for the same templates.
TEMPLATE_ALIASES = {
    "llama3": "llama-3", "llama-31": "llama-3.1", "llama3.1": "llama-3.1", "llama-3.2": "llama-3.1",
    "llama-32": "llama-3.1", "llama3.2": "llama-3.1", "llama-3.3": "llama-3.1", "llama-33": "llama-3.1",
    "llama3.3": "llama-3.1",
    "qwen2.5": "qwen-2.5", "qwen25": "qwen-2.5", "qwen-25": "qwen-2.5", "qwen2": "qwen-2.5", "qwen-2": "qwen-2.5",
    "qwen3": "qwen-3", "qwen-3": "qwen-3",
    "gemma2": "gemma", "gemma-2": "gemma", "gemma3": "gemma", "gemma-3": "gemma", "gemma-3n": "gemma",
    "gemma3n": "gemma",
    "phi3": "phi-3", "phi-3.5": "phi-3", "phi-35": "phi-3", "phi3.5": "phi-3", "phi4": "phi-4",
    "mistral-instruct": "mistral", "mixtral": "mistral",
    "vicuna-1.1": "vicuna",
}


def list_chat_templates() -> list[str]:
    """Every name get_chat_template accepts."""
    return sorted(set(CHAT_TEMPLATES) | set(TEMPLATE_ALIASES))


def _template_named(name: str) -> tuple[str, ChatTemplate]:
    key = name.lower()
    key = TEMPLATE_ALIASES.get(key, key)
    if key not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat_template {name!r}; known templates: {', '.join(list_chat_templates())} "
                         "(or pass your own as (jinja_template, stop_word))")
    return key, CHAT_TEMPLATES[key]


# Substrings of a model's name (most specific first) and the template its family uses.
_FAMILY_BY_NAME = (
    ("llama-3.1", "llama-3.1"), ("llama-3.2", "llama-3.1"), ("llama-3.3", "llama-3.1"), ("llama-3", "llama-3"),
    ("llama3", "llama-3"), ("qwen3", "qwen-3"), ("qwen2", "qwen-2.5"), ("gemma", "gemma"), ("phi-4", "phi-4"),
    ("phi-3", "phi-3"), ("mistral", "mistral"), ("mixtral", "mistral"), ("zephyr", "zephyr"), ("smollm", "chatml"),
    ("hermes", "chatml"), ("vicuna", "vicuna"),
)


def template_name_for_model(model_name: str) -> str | None:
    """The template of a model's family, guessed from its name (mlx-tune's chat_template="auto")."""
    lowered = (model_name or "").lower()
    for fragment, name in _FAMILY_BY_NAME:
        if fragment in lowered:
            return name
    return None


get_template_for_model = template_name_for_model  # mlx-tune's name for it


def _preamble(mapping: dict | None, system_message: str | None) -> str:
    """Jinja that runs before a template body: ShareGPT-style messages (other key and role names)
    become role/content ones, and a conversation without a system message gets the default one."""
    parts = []
    if mapping:
        role_key, content_key = mapping.get("role", "role"), mapping.get("content", "content")
        roles = {mapping.get(name, name): name for name in ("user", "assistant", "system")}
        if (role_key, content_key) != ("role", "content") or any(k != v for k, v in roles.items()):
            parts.append(
                "{%- if messages and messages[0][" + json.dumps(role_key) + "] is defined %}"
                "{%- set mapped = namespace(messages=[]) %}"
                "{%- for m in messages %}"
                "{%- set mapped.messages = mapped.messages + [{'role': " + json.dumps(roles) + ".get(m["
                + json.dumps(role_key) + "], m[" + json.dumps(role_key) + "]), 'content': m["
                + json.dumps(content_key) + "]}] %}"
                "{%- endfor %}"
                "{%- set messages = mapped.messages %}"
                "{%- endif %}")
    if system_message:
        parts.append(
            "{%- if not messages or messages[0]['role'] != 'system' %}"
            "{%- set messages = [{'role': 'system', 'content': " + json.dumps(system_message) + "}] + messages %}"
            "{%- endif %}")
    return "".join(parts)


def _set_on_tokenizer(tokenizer, name: str, value):
    """Set an attribute on the HF tokenizer and, for mlx-lm's TokenizerWrapper, on the wrapper too."""
    hf = _hf_tokenizer(tokenizer)
    setattr(hf, name, value)
    if hf is not tokenizer:
        try:
            setattr(tokenizer, name, value)
        except AttributeError:
            pass


def _single_token_id(tokenizer, token: str) -> int | None:
    hf = _hf_tokenizer(tokenizer)
    vocab = hf.get_vocab() if hasattr(hf, "get_vocab") else {}
    return vocab.get(token)


def get_chat_template(tokenizer, chat_template="chatml", mapping: dict | None = None, map_eos_token: bool = True,
                      system_message: str | None = None, **kwargs):
    """Set ``tokenizer.chat_template`` to a named template and return the tokenizer (Unsloth's
    ``get_chat_template``).

    chat_template: a name (``list_chat_templates()``), "auto" (the family's template guessed from
    the tokenizer's model name), or your own ``(jinja_template, stop_word)``.
    mapping: for ShareGPT-style messages, e.g. ``{"role": "from", "content": "value",
    "user": "human", "assistant": "gpt"}``; messages that already have "role" render unchanged.
    map_eos_token: make the template's end-of-turn token (e.g. ChatML's ``<|im_end|>``) the
    tokenizer's EOS, so that generation stops at the end of a turn. Unsloth renames the old EOS
    token instead; here the end-of-turn token must already be in the vocabulary (else a warning).
    system_message: the system message used when a conversation has none (replaces a template's
    default one, e.g. Qwen2.5's "You are Qwen, ...").
    """
    if kwargs:
        warnings.warn(f"get_chat_template: ignoring {', '.join(sorted(kwargs))}", stacklevel=2)
    if isinstance(chat_template, (tuple, list)):
        jinja, stop_word = chat_template
        template = ChatTemplate(jinja, stop_word, "", "")
        name = None
    else:
        if str(chat_template).lower() == "auto":
            model_name = getattr(_hf_tokenizer(tokenizer), "name_or_path", "") or ""
            guessed = template_name_for_model(model_name)
            if guessed is None:
                raise ValueError(f"chat_template='auto': no template is known for {model_name!r}; "
                                 f"pass one of: {', '.join(list_chat_templates())}")
            chat_template = guessed
        name, template = _template_named(chat_template)
    default_system = system_message if system_message is not None else template.default_system_message
    _set_on_tokenizer(tokenizer, "chat_template", _preamble(mapping, default_system) + template.jinja)
    if map_eos_token:
        _map_eos_token(tokenizer, template.stop_word)
    # train_on_responses_only reads these when it is given no parts.
    _set_on_tokenizer(tokenizer, "_macft_chat_template", name)
    return tokenizer


def _map_eos_token(tokenizer, stop_word: str):
    if stop_word == "eos_token" or getattr(tokenizer, "eos_token", None) == stop_word:
        return
    if _single_token_id(tokenizer, stop_word) is None:
        warnings.warn(f"get_chat_template: {stop_word!r} ends each turn of this template but is not a token of "
                      f"this tokenizer; EOS stays {getattr(tokenizer, 'eos_token', None)!r}, so generation will not "
                      "stop at the end of a turn (pick a template of the model's family)", stacklevel=3)
        return
    _set_on_tokenizer(tokenizer, "eos_token", stop_word)


# ---------------------------------------------------------------------------------------------
# ShareGPT


SYSTEM_ALIASES = ("system",)
USER_ALIASES = ("user", "human", "input")
ASSISTANT_ALIASES = ("gpt", "assistant", "output", "model", "bot")
TOOL_ALIASES = ("tool", "function", "observation")


def _role_map(aliases_for_system, aliases_for_user, aliases_for_assistant, aliases_for_tool) -> dict:
    roles = {}
    for role, aliases in (("system", aliases_for_system), ("user", aliases_for_user),
                          ("assistant", aliases_for_assistant), ("tool", aliases_for_tool)):
        roles.update({alias: role for alias in aliases})
    return roles


def _standard_message(message, roles: dict, where: str) -> dict:
    if not isinstance(message, dict):
        raise DataError(f"{where}: a message must be an object, got {type(message).__name__}")
    role_key = "from" if "from" in message else "role"
    content_key = "value" if "value" in message else "content"
    if role_key not in message or content_key not in message:
        raise DataError(f"{where}: a message needs 'from'/'value' (or 'role'/'content'), found keys {sorted(message)}")
    role = message[role_key]
    if role not in roles:
        raise DataError(f"{where}: role {role!r} is not one of the aliases {sorted(roles)}; "
                        "pass aliases_for_user= / aliases_for_assistant= / ...")
    return {"role": roles[role], "content": message[content_key]}


def _standard_conversations(rows, roles: dict) -> list[list[dict]]:
    return [[_standard_message(message, roles, f"row {i + 1}") for message in row["conversations"]]
            for i, row in enumerate(rows)]


def standardize_sharegpt(dataset, aliases_for_system=SYSTEM_ALIASES, aliases_for_user=USER_ALIASES,
                         aliases_for_assistant=ASSISTANT_ALIASES, aliases_for_tool=TOOL_ALIASES, **kwargs):
    """ShareGPT rows ``{"conversations": [{"from": "human", "value": ...}, ...]}`` to
    ``{"conversations": [{"role": "user", "content": ...}, ...]}`` (Unsloth's function: the column
    keeps its name; human/user/input -> user, gpt/assistant/output -> assistant, system -> system,
    and here also tool). Takes and returns a list of dicts or an HF ``datasets.Dataset``; rows
    without "conversations" come back unchanged. ``tokenizer``, ``num_proc``, ``batch_size`` are
    accepted and ignored."""
    roles = _role_map(aliases_for_system, aliases_for_user, aliases_for_assistant, aliases_for_tool)
    if hasattr(dataset, "column_names") and hasattr(dataset, "map"):  # HF Dataset
        if "conversations" not in dataset.column_names:
            return dataset
        conversations = _standard_conversations(dataset, roles)
        return dataset.remove_columns("conversations").add_column("conversations", conversations)
    rows = list(dataset)
    if not rows or "conversations" not in rows[0]:
        return rows
    conversations = _standard_conversations(rows, roles)
    return [{**row, "conversations": conversation} for row, conversation in zip(rows, conversations)]


standardize_data_formats = standardize_sharegpt  # Unsloth's newer name for it


_OPTIONAL_BLOCK = re.compile(r"\[\[(.+?)\]\]", flags=re.DOTALL)
_COLUMN = re.compile(r"\{(.+?)\}")


def _merge_columns(merged_prompt: str, row: dict) -> str:
    """Fill merged_prompt's {column}s from the row; a [[...]] block is left out when its first
    column is empty or missing."""
    text, position = [], 0
    for block in _OPTIONAL_BLOCK.finditer(merged_prompt):
        text.append(merged_prompt[position:block.start()].format_map(row))
        inner = block.group(1)
        columns = _COLUMN.findall(inner)
        if not columns:
            raise ValueError(f"to_sharegpt: the optional block [[{inner}]] names no {{column}}")
        if row.get(columns[0]) not in (None, ""):
            text.append(inner.format_map(row))
        position = block.end()
    text.append(merged_prompt[position:].format_map(row))
    return "".join(text)


def to_sharegpt(dataset, merged_prompt: str = "", merged_column_name: str = "instruction",
                output_column_name: str = "output", remove_unused_columns: bool = True,
                conversation_extension: int = 1, random_state: int = 3407):
    """Rows with instruction-like columns to ShareGPT conversations (Unsloth's ``to_sharegpt``).

    merged_prompt joins columns into the user turn, e.g. ``"{instruction}[[\\nInput: {input}]]"``
    ([[...]] is left out where its first column is empty); the default is the
    ``merged_column_name`` column. The assistant turn is ``output_column_name``.
    conversation_extension > 1 appends that many - 1 other rows (drawn at random with
    ``random_state``) to each conversation, making multi-turn data from single turns.
    Takes and returns a list of dicts or an HF ``datasets.Dataset``."""
    is_hf = hasattr(dataset, "column_names") and hasattr(dataset, "map")
    rows = [dict(row) for row in dataset]
    if rows and isinstance(rows[0].get("conversations"), list):
        raise TypeError("to_sharegpt: the data already has ShareGPT 'conversations'")
    prompt = merged_prompt or "{" + merged_column_name + "}"
    for column in set(_COLUMN.findall(prompt)) | {output_column_name}:
        if rows and column not in rows[0]:
            raise KeyError(f"to_sharegpt: column {column!r} is not in the data (columns: {sorted(rows[0])})")
    conversations = [[{"from": "human", "value": _merge_columns(prompt, row)},
                      {"from": "gpt", "value": str(row[output_column_name])}] for row in rows]
    extended = [list(conversation) for conversation in conversations]
    for j in range(1, max(int(conversation_extension), 1)):
        order = list(range(len(rows)))
        random.Random(random_state + j).shuffle(order)
        for conversation, other in zip(extended, order):
            conversation.extend(conversations[other])
    if remove_unused_columns:
        out = [{"conversations": conversation} for conversation in extended]
    else:
        out = [{**row, "conversations": conversation} for row, conversation in zip(rows, extended)]
    if is_hf:
        import datasets

        return datasets.Dataset.from_list(out)
    return out


def apply_chat_template(dataset, tokenizer=None, chat_template=None, default_system_message=None,
                        extra_eos_tokens=None, **kwargs):
    """Unsloth builds a template from an Alpaca-style string with {INPUT}/{OUTPUT}/{SYSTEM} here;
    macft does not."""
    raise NotImplementedError(
        "macft.chat_templates.apply_chat_template (Unsloth's custom {INPUT}/{OUTPUT} templates) is not "
        "implemented; use get_chat_template(tokenizer, '<name>') and pass the conversations to SFTTrainer "
        "as {'messages': [...]} rows (or render them with tokenizer.apply_chat_template)")


def construct_chat_template(*args, **kwargs):
    raise NotImplementedError("macft.chat_templates.construct_chat_template is not implemented; "
                              "pass your own template to get_chat_template as (jinja_template, stop_word)")


# ---------------------------------------------------------------------------------------------
# Response-only loss


def _is_whitespace_token(tokenizer, token_id: int, cache: dict) -> bool:
    if token_id not in cache:
        cache[token_id] = _hf_tokenizer(tokenizer).decode([token_id]).strip() == ""
    return cache[token_id]


def _part_tokenizations(tokenizer, part: str) -> list[tuple[list[int], int]]:
    """The ways `part` shows up as tokens: alone, and after a newline or a space (SentencePiece
    tokenizers start a text with a different token than the same text mid-line). Each comes as
    (ids without the trailing whitespace tokens, how many of those there were): the newline
    closing a header can merge with a newline starting the content."""
    whitespace = {}
    found = []
    for context in ("", "\n", " "):
        context_ids = _encode(tokenizer, context) if context else []
        ids = _encode(tokenizer, context + part)
        if ids[:len(context_ids)] != context_ids:
            continue
        ids = ids[len(context_ids):]
        trailing = 0
        while len(ids) - trailing > 1 and _is_whitespace_token(tokenizer, ids[len(ids) - trailing - 1], whitespace):
            trailing += 1
        core = (ids[:len(ids) - trailing], trailing)
        if core[0] and core not in found:
            found.append(core)
    if not found:
        raise ValueError(f"{part!r} tokenizes to nothing")
    return found


def _find_part(input_ids: list[int], part_tokenizations, start: int) -> tuple[int, int, int] | None:
    """(position, end of core, trailing whitespace tokens allowed) of the first occurrence at or after start."""
    best = None
    for core, trailing in part_tokenizations:
        n = len(core)
        for i in range(start, len(input_ids) - n + 1):
            if input_ids[i:i + n] == core:
                if best is None or i < best[0]:
                    best = (i, i + n, trailing)
                break
    return best


def response_mask(input_ids: list[int], tokenizer, instruction_tokens, response_tokens, whitespace: dict) -> list[int]:
    """1 on the tokens after each response part up to the next instruction part (or the end):
    the response, its end-of-turn token and what the template writes after it, as Unsloth and
    macft's own assistant-only masks count a turn; 0 elsewhere."""
    mask = [0] * len(input_ids)
    position = 0
    while True:
        response = _find_part(input_ids, response_tokens, position)
        if response is None:
            return mask
        _, start, trailing = response
        while trailing and start < len(input_ids) and _is_whitespace_token(tokenizer, input_ids[start], whitespace):
            start, trailing = start + 1, trailing - 1
        instruction = _find_part(input_ids, instruction_tokens, start)
        end = instruction[0] if instruction is not None else len(input_ids)
        position = max(end, start)
        for i in range(start, end):
            mask[i] = 1


def _trainer_tokenizer(trainer):
    for name in ("processing_class", "tokenizer"):
        tokenizer = getattr(trainer, name, None)
        if tokenizer is not None:
            return tokenizer
    raise ValueError("train_on_responses_only: the trainer has no tokenizer; pass tokenizer=")


def _parts(tokenizer, instruction_part, response_part) -> tuple[str, str]:
    if instruction_part is not None and response_part is not None:
        return instruction_part, response_part
    name = getattr(tokenizer, "_macft_chat_template", None) or getattr(_hf_tokenizer(tokenizer),
                                                                       "_macft_chat_template", None)
    if name is None:
        raise ValueError("train_on_responses_only needs instruction_part= and response_part= (e.g. "
                         "'<|im_start|>user\\n' and '<|im_start|>assistant\\n' for ChatML), unless the tokenizer's "
                         "template was set by get_chat_template")
    template = CHAT_TEMPLATES[name]
    return instruction_part or template.instruction_part, response_part or template.response_part


def _examples(dataset, split: str):
    examples = getattr(dataset, "examples", None)
    if examples is None:
        raise TypeError(f"train_on_responses_only: trainer.{split} has no tokenized .examples; "
                        "pass a trainer made by macft's SFTTrainer")
    return examples


def _mask_examples(examples, mask_of, split: str):
    """Narrow each example's loss mask to its responses (tokens the trainer already masked stay
    masked); drop examples left with nothing to train on."""
    kept = []
    for example in examples:
        new_mask = mask_of(example.input_ids)
        example.loss_mask = [int(old and new) for old, new in zip(example.loss_mask, new_mask)]
        if example.loss_mask:
            example.loss_mask[0] = 0
        if any(example.loss_mask):
            kept.append(example)
    dropped = len(examples) - len(kept)
    if dropped:
        warnings.warn(f"train_on_responses_only: {dropped} of {len(examples)} {split} examples have no response "
                      "tokens (response part not found, or cut off by max_seq_length) and were dropped", stacklevel=3)
    examples[:] = kept  # in place: the trainer holds this same list


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None,
                            force_match: bool = True, tokenizer=None, return_function: bool = False,
                            num_proc=None):
    """Train only on assistant responses (Unsloth's ``train_on_responses_only``): in every tokenized
    example of ``trainer.train_dataset`` (and ``eval_dataset``), the tokens after each
    ``response_part`` up to the next ``instruction_part`` (or the end) stay targets; everything else
    is masked; tokens the trainer had masked already stay masked. Examples left with no target
    are dropped. Returns the trainer.

    Without the parts, the ones of the template get_chat_template set are used.
    ``return_function=True`` returns Unsloth's batch function instead:
    ``{"input_ids": [[...], ...]} -> {"labels": [[...], ...]}`` with -100 on masked tokens.
    """
    tokenizer = tokenizer if tokenizer is not None else _trainer_tokenizer(trainer)
    instruction_part, response_part = _parts(tokenizer, instruction_part, response_part)
    instruction_tokens = _part_tokenizations(tokenizer, instruction_part)
    response_tokens = _part_tokenizations(tokenizer, response_part)
    whitespace = {}

    def mask_of(input_ids):
        return response_mask(list(input_ids), tokenizer, instruction_tokens, response_tokens, whitespace)

    if return_function:
        def labels_of(batch):
            return {"labels": [[token if keep else -100 for token, keep in zip(ids, mask_of(ids))]
                               for ids in batch["input_ids"]]}
        return labels_of

    examples = _examples(trainer.train_dataset, "train_dataset")
    _mask_examples(examples, mask_of, "train_dataset")
    if not examples:
        raise DataError(f"train_on_responses_only: no training example contains response_part {response_part!r} "
                        "followed by a token to train on; check it against the chat template")
    if getattr(trainer, "eval_dataset", None) is not None:
        _mask_examples(_examples(trainer.eval_dataset, "eval_dataset"), mask_of, "eval_dataset")
    return trainer
