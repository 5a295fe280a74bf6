"""macft.chat_templates: named templates render exactly as the model families' own templates,
ShareGPT conversion, and train_on_responses_only's masks.

Reference templates are the real ones TRL ships (trl/chat_templates/*.jinja, copied from the
models' tokenizer_config.json) and SmolLM2's own (ChatML); families with none available locally
are checked against a literal of their documented format, with its source.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from macft.chat_templates import (CHAT_TEMPLATES, get_chat_template, list_chat_templates, standardize_sharegpt,
                                  to_sharegpt, train_on_responses_only)
from macft.data import DataError, tokenize_sft

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hi there "},  # padded: Llama and Gemma trim contents
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
NO_SYSTEM = CONVERSATION[1:]


@pytest.fixture(scope="module")
def tok(smollm2_hf_dir):
    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture
def fresh_tok(smollm2_hf_dir):
    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


def trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / name).read_text()


def render(tok, template: str, messages, add_generation_prompt=False, **kwargs) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, **kwargs)


def named(tok, name: str, **kwargs) -> str:
    return get_chat_template(tok, name, **kwargs).chat_template


# (our name, the family's real template, the conversation it accepts)
REAL_TEMPLATES = [
    ("llama-3", "llama3.jinja", CONVERSATION),
    ("llama-3.1", "llama3_1.jinja", CONVERSATION),
    ("llama-3.2", "llama3_2.jinja", CONVERSATION),
    ("qwen-2.5", "qwen2_5.jinja", CONVERSATION),
    ("qwen2.5", "qwen2_5.jinja", NO_SYSTEM),  # gets Qwen's default system message
    ("qwen3", "qwen3.jinja", CONVERSATION),
    ("gemma", "gemma.jinja", NO_SYSTEM),  # Gemma 1/2's template refuses system messages
    ("gemma-3", "gemma3.jinja", CONVERSATION),
    ("phi-3", "phi3.jinja", CONVERSATION),
    ("phi-3.5", "phi3_5.jinja", CONVERSATION),
]


@pytest.mark.parametrize("name,reference,messages", REAL_TEMPLATES)
def test_renders_like_the_family_template(fresh_tok, name, reference, messages):
    ours, theirs = named(fresh_tok, name, map_eos_token=False), trl_template(reference)
    kwargs = {"date_string": "26 Jul 2024"} if reference == "llama3_2.jinja" else {}  # 3.2's default is today
    for add_generation_prompt, turns in ((False, messages), (True, messages[:-1])):
        assert (render(fresh_tok, ours, turns, add_generation_prompt, **kwargs)
                == render(fresh_tok, theirs, turns, add_generation_prompt, **kwargs))


def test_llama_31_text(fresh_tok):
    text = render(fresh_tok, named(fresh_tok, "llama-3.1"), CONVERSATION[:3], bos_token="<|begin_of_text|>")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")


def test_qwen3_thinking(fresh_tok):
    template = named(fresh_tok, "qwen3")
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}]
    assert render(fresh_tok, template, messages) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n")
    assert render(fresh_tok, template, messages, True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    reference = trl_template("qwen3.jinja")
    for turns in (messages, messages + [{"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]):
        assert render(fresh_tok, template, turns) == render(fresh_tok, reference, turns)


def test_chatml_is_smollm2s_format(fresh_tok):
    """SmolLM2's own template is ChatML with a default system message of its own."""
    smollm2 = fresh_tok.chat_template
    ours = named(fresh_tok, "chatml")
    for add_generation_prompt, turns in ((False, CONVERSATION), (True, CONVERSATION[:-1])):
        assert render(fresh_tok, ours, turns, add_generation_prompt) == render(fresh_tok, smollm2, turns,
                                                                                add_generation_prompt)


# Documented formats, for families whose template is not available offline.
DOCUMENTED = [
    # Mistral-7B-Instruct-v0.2 tokenizer_config.json: '[INST] ' + user + ' [/INST]', assistant + eos.
    ("mistral", NO_SYSTEM, "<s>[INST]  Hi there  [/INST]Hello!</s>[INST] 2+2? [/INST]4</s>"),
    # microsoft/phi-4 tokenizer_config.json: <|im_start|>role<|im_sep|>content<|im_end|>, no newlines.
    ("phi-4", CONVERSATION[:3], "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|> Hi there "
                                "<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|>"),
    # HuggingFaceH4/zephyr-7b-beta model card: "<|system|>\n...</s>\n<|user|>\n...</s>\n<|assistant|>\n".
    ("zephyr", CONVERSATION[:3], "<|system|>\nBe brief.</s>\n<|user|>\n Hi there </s>\n<|assistant|>\nHello!</s>\n"),
    # tatsu-lab/stanford_alpaca README: "Below is an instruction ...\n\n### Instruction:\n{instruction}\n\n
    # ### Response:\n" (multi-turn: each response ends with EOS and a blank line).
    ("alpaca", [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
     "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request."
     "\n\n### Instruction:\nName a colour.\n\n### Response:\nRed.</s>\n\n"),
    # lm-sys/FastChat docs/vicuna_weights_version.md (v1.1): "{system} USER: {u} ASSISTANT: {a}</s>USER: ...".
    ("vicuna", NO_SYSTEM,
     "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
     "detailed, and polite answers to the user's questions. USER:  Hi there  ASSISTANT: Hello!</s>USER: 2+2? "
     "ASSISTANT: 4</s>"),
]


@pytest.mark.parametrize("name,messages,expected", DOCUMENTED)
def test_renders_the_documented_format(fresh_tok, name, messages, expected):
    text = render(fresh_tok, named(fresh_tok, name, map_eos_token=False), messages, bos_token="<s>", eos_token="</s>")
    assert text == expected


def test_generation_prompts(fresh_tok):
    expected = {"mistral": "[INST] 2+2? [/INST]", "phi-4": "<|im_start|>assistant<|im_sep|>",
                "zephyr": "<|assistant|>\n", "alpaca": "### Response:\n", "vicuna": "USER: 2+2? ASSISTANT:"}
    for name, ending in expected.items():
        text = render(fresh_tok, named(fresh_tok, name, map_eos_token=False), NO_SYSTEM[:3], True)
        assert text.endswith(ending), name


def test_unknown_name_lists_the_known_ones(fresh_tok):
    with pytest.raises(ValueError, match="unknown chat_template 'llama-9'.*chatml.*llama-3.1.*zephyr"):
        get_chat_template(fresh_tok, "llama-9")
    assert {"llama-3.1", "chatml", "qwen-2.5", "qwen3", "gemma-3", "phi-4", "mistral", "alpaca", "vicuna",
            "zephyr"} <= set(list_chat_templates())


def test_custom_template_and_auto(fresh_tok):
    get_chat_template(fresh_tok, ("{{ messages[0]['content'] }}", "<|im_end|>"))
    assert render(fresh_tok, fresh_tok.chat_template, NO_SYSTEM) == " Hi there "
    get_chat_template(fresh_tok, "auto")  # SmolLM2 -> ChatML
    assert render(fresh_tok, fresh_tok.chat_template, NO_SYSTEM[:1]) == "<|im_start|>user\n Hi there <|im_end|>\n"


def test_sharegpt_mapping_renders_like_role_content(fresh_tok):
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in CONVERSATION]
    template = named(fresh_tok, "llama-3.1", mapping={"role": "from", "content": "value", "user": "human",
                                                     "assistant": "gpt"})
    assert render(fresh_tok, template, sharegpt) == render(fresh_tok, template, CONVERSATION)
    assert render(fresh_tok, template, sharegpt) == render(fresh_tok, trl_template("llama3_1.jinja"), CONVERSATION)


def test_system_message_fills_in_a_missing_system_turn(fresh_tok):
    template = named(fresh_tok, "qwen-2.5", system_message="Answer in French.")
    assert render(fresh_tok, template, NO_SYSTEM[:1]).startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n")
    assert render(fresh_tok, template, CONVERSATION[:2]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_map_eos_token(fresh_tok):
    fresh_tok.eos_token = "<|endoftext|>"
    get_chat_template(fresh_tok, "chatml")
    assert fresh_tok.eos_token == "<|im_end|>" and fresh_tok.eos_token_id == 2
    with pytest.warns(UserWarning, match="'<\\|eot_id\\|>' ends each turn"):
        get_chat_template(fresh_tok, "llama-3")  # SmolLM2 has no <|eot_id|> token
    assert fresh_tok.eos_token == "<|im_end|>"
    fresh_tok.eos_token = "<|endoftext|>"
    get_chat_template(fresh_tok, "chatml", map_eos_token=False)
    assert fresh_tok.eos_token == "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# ShareGPT

SHAREGPT_ROWS = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello!"}], "id": 1},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                       {"from": "tool", "value": "ok"}], "id": 2},
]
STANDARD_ROWS = [
    {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello!"}], "id": 1},
    {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                       {"role": "tool", "content": "ok"}], "id": 2},
]


def test_standardize_sharegpt_list():
    assert standardize_sharegpt(SHAREGPT_ROWS) == STANDARD_ROWS
    assert standardize_sharegpt(STANDARD_ROWS) == STANDARD_ROWS  # already standard: unchanged
    assert standardize_sharegpt([{"text": "x"}]) == [{"text": "x"}]


def test_standardize_sharegpt_dataset():
    from datasets import Dataset

    converted = standardize_sharegpt(Dataset.from_list(SHAREGPT_ROWS))
    assert isinstance(converted, Dataset)
    assert converted.to_list() == STANDARD_ROWS


def test_standardize_sharegpt_unknown_role():
    with pytest.raises(DataError, match="row 1: role 'narrator' is not one of the aliases"):
        standardize_sharegpt([{"conversations": [{"from": "narrator", "value": "Once"}]}])


def test_to_sharegpt():
    rows = [{"instruction": "Add", "input": "2 and 2", "output": 4}, {"instruction": "Greet", "input": "", "output": "Hi"}]
    converted = to_sharegpt(rows, merged_prompt="{instruction}[[\nInput: {input}]]", output_column_name="output")
    assert converted == [
        {"conversations": [{"from": "human", "value": "Add\nInput: 2 and 2"}, {"from": "gpt", "value": "4"}]},
        {"conversations": [{"from": "human", "value": "Greet"}, {"from": "gpt", "value": "Hi"}]}]
    extended = to_sharegpt(rows, merged_prompt="{instruction}", conversation_extension=2)
    assert all(len(row["conversations"]) == 4 for row in extended)
    assert [row["conversations"][:2] for row in extended] == [
        [{"from": "human", "value": "Add"}, {"from": "gpt", "value": "4"}],
        [{"from": "human", "value": "Greet"}, {"from": "gpt", "value": "Hi"}]]
    messages = standardize_sharegpt(converted)[0]["conversations"]
    assert messages == [{"role": "user", "content": "Add\nInput: 2 and 2"}, {"role": "assistant", "content": "4"}]


# ---------------------------------------------------------------------------------------------
# train_on_responses_only


@dataclass
class StandIn:
    """What train_on_responses_only needs of an SFTTrainer: tokenized examples and a tokenizer."""

    examples: list


class StandInTrainer:
    def __init__(self, tokenizer, examples, eval_examples=None):
        self.processing_class = tokenizer
        self.train_dataset = StandIn(examples)
        self.eval_dataset = StandIn(eval_examples) if eval_examples is not None else None


MULTI_TURN = [
    {"messages": CONVERSATION},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "\n1 2 3"},
                  {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome."}]},
]


def targets(tok, example):
    return tok.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


@pytest.mark.parametrize("template,parts", [
    ("chatml", ("<|im_start|>user\n", "<|im_start|>assistant\n")),
    ("alpaca", ("### Instruction:\n", "### Response:\n")),  # plain-text markers, no special tokens
    ("chatml", (None, None)),  # the parts of the template get_chat_template set
])
def test_masks_exactly_the_assistant_turns(fresh_tok, template, parts):
    """Masks from train_on_responses_only equal macft's own assistant-only masks of the same
    conversations (tokenize_sft renders each turn and masks by character spans: an independent path)."""
    get_chat_template(fresh_tok, template)
    everything, _ = tokenize_sft(MULTI_TURN, fresh_tok, 512, train_on_prompt=True)
    assistant_only, _ = tokenize_sft(MULTI_TURN, fresh_tok, 512, train_on_prompt=False)
    trainer = StandInTrainer(fresh_tok, everything, eval_examples=list(everything))
    assert train_on_responses_only(trainer, *parts) is trainer
    for ours, reference in zip(trainer.train_dataset.examples, assistant_only):
        assert ours.input_ids == reference.input_ids
        assert ours.loss_mask == reference.loss_mask, (targets(fresh_tok, ours), targets(fresh_tok, reference))
    assert [e.loss_mask for e in trainer.eval_dataset.examples] == [e.loss_mask for e in assistant_only]


def test_text_rows_train_on_the_responses(fresh_tok):
    """Unsloth's notebook flow: conversations rendered to "text", then responses only."""
    get_chat_template(fresh_tok, "chatml")
    rows = [{"text": fresh_tok.apply_chat_template(row["messages"], tokenize=False)} for row in MULTI_TURN]
    examples, _ = tokenize_sft(rows, fresh_tok, 512)
    train_on_responses_only(StandInTrainer(fresh_tok, examples), "<|im_start|>user\n", "<|im_start|>assistant\n")
    # The text row's own EOS (appended by tokenize_sft) follows the last turn and trains with it.
    assert targets(fresh_tok, examples[0]) == "Hello!<|im_end|>\n4<|im_end|>\n<|im_end|>"
    # "\n1 2 3": the header's newline and the content's are one token, part header: not trained.
    assert targets(fresh_tok, examples[2]) == "1 2 3<|im_end|>\nYou're welcome.<|im_end|>\n<|im_end|>"


def test_keeps_masked_tokens_masked_and_drops_examples_without_responses(fresh_tok):
    get_chat_template(fresh_tok, "chatml")
    rows = MULTI_TURN[:2] + [{"messages": [{"role": "user", "content": "only a question"},
                                           {"role": "assistant", "content": "x"}]}]
    examples, _ = tokenize_sft(rows, fresh_tok, 512, train_on_prompt=True)
    examples[2].input_ids = fresh_tok("<|im_start|>user\nno answer<|im_end|>\n")["input_ids"]
    examples[2].loss_mask = [1] * len(examples[2].input_ids)
    examples[1].loss_mask = [0] * len(examples[1].loss_mask)  # already masked by the trainer: stays so
    examples[1].loss_mask[-3] = 1
    trainer = StandInTrainer(fresh_tok, examples)
    with pytest.warns(UserWarning, match="1 of 3 train_dataset examples have no response tokens"):
        train_on_responses_only(trainer, "<|im_start|>user\n", "<|im_start|>assistant\n")
    kept = trainer.train_dataset.examples
    assert len(kept) == 2 and kept[1] is examples[1]
    assert targets(fresh_tok, kept[1]) == "."  # "Red.<|im_end|>\n" is the response; only "." was a target
    with pytest.raises(DataError, match="no training example contains response_part"):
        train_on_responses_only(StandInTrainer(fresh_tok, list(examples)), "<|im_start|>user\n", "<|x|>")


def test_return_function_gives_unsloth_labels(fresh_tok):
    get_chat_template(fresh_tok, "chatml")
    ids = fresh_tok.apply_chat_template(MULTI_TURN[1]["messages"], tokenize=False)
    ids = fresh_tok(ids)["input_ids"]
    labels_of = train_on_responses_only(None, "<|im_start|>user\n", "<|im_start|>assistant\n", tokenizer=fresh_tok,
                                        return_function=True)
    labels = labels_of({"input_ids": [ids]})["labels"][0]
    assert fresh_tok.decode([t for t in labels if t != -100]) == "Red.<|im_end|>\n"


def test_needs_the_parts_or_a_named_template(fresh_tok):
    examples, _ = tokenize_sft(MULTI_TURN, fresh_tok, 512)
    with pytest.raises(ValueError, match="needs instruction_part= and response_part="):
        train_on_responses_only(StandInTrainer(fresh_tok, examples))


def test_with_a_real_sft_trainer(smollm2_hf_dir, tmp_path):
    from macft import FastLanguageModel, SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(str(smollm2_hf_dir), max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"])
    tokenizer = get_chat_template(tokenizer, "chatml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=MULTI_TURN,
                             args=SFTConfig(max_steps=1, output_dir=str(tmp_path / "run"), train_on_prompt=True))
    assistant_only, _ = tokenize_sft(MULTI_TURN, tokenizer, 256, train_on_prompt=False)
    train_on_responses_only(trainer, "<|im_start|>user\n", "<|im_start|>assistant\n")
    assert [e.loss_mask for e in trainer.train_dataset.examples] == [e.loss_mask for e in assistant_only]
    row = trainer.train_dataset[0]
    labels = [label for label in row["labels"] if label != -100]
    assert tokenizer.decode(labels) == "Hello!<|im_end|>\n4<|im_end|>\n"
