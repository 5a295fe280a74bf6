"""macft.data reads rows as TRL 1.16 and mlx-lm-lora 5.10.2 read them.

The expected values come from their own code, run here on the same rows with SmolLM2's real
tokenizer: TRL's SFTTrainer / DPOTrainer / KTOTrainer dataset preparation (``_prepare_dataset``,
called without building a trainer: it needs only the tokenizer and the config) and
GRPOTrainer's prompt tokenization; mlx-lm-lora's ``create_dataset`` for its ``*_feature`` column
names. Nothing here restates their rules.
"""

import importlib.util
import json
import types
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from macft.data import (DataError, load_prompt_dataset, load_rows, load_sft_dataset, tokenize_preference,
                        tokenize_prompts, tokenize_sft, tokenize_unpaired)

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

PEER_DATASETS = (Path(__file__).resolve().parents[1] / ".venv-peer" / "lib" / "python3.11" / "site-packages"
                 / "mlx_lm_lora" / "trainer" / "datasets.py")

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, of course."}]


@pytest.fixture(scope="module")
def tok(smollm2_hf_dir):
    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="module")
def bos_tok(smollm2_hf_dir):
    """SmolLM2's tokenizer made to prepend token 0 to plain text, like Llama's BOS."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", 0)])
    return tokenizer


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trl"))


# ------------------------------------------------------------------------------- TRL's preparation

def trl_sft(rows, tokenizer, output_dir, completion_only_loss=None):
    """[(input_ids, targets)] from TRL's SFTTrainer._prepare_dataset; targets[i]: labels[i] != -100."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=output_dir, max_length=None, use_cpu=True, bf16=False, report_to=[],
                     completion_only_loss=completion_only_loss)
    sample = rows[0]
    trainer = types.SimpleNamespace(
        _tokenizer=tokenizer, chat_template=None,
        completion_only_loss=("prompt" in sample and "completion" in sample) if completion_only_loss is None
        else completion_only_loss)
    prepared = SFTTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tokenizer, args, False, None,
                                           "train")
    return [(row["input_ids"], [int(label != -100) for label in row["labels"]]) for row in prepared]


def trl_pairs(rows, tokenizer, output_dir):
    """[(prompt_ids, chosen_ids, rejected_ids)] from TRL's DPOTrainer._prepare_dataset."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=output_dir, max_length=None, use_cpu=True, bf16=False, report_to=[])
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    prepared = DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train")
    return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in prepared]


def trl_unpaired(rows, tokenizer, output_dir):
    """[(prompt_ids, completion_ids, label)] from TRL's KTOTrainer._prepare_dataset."""
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=output_dir, max_length=None, use_cpu=True, bf16=False, report_to=[])
    trainer = types.SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False)
    prepared = KTOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train")
    return sorted((row["prompt_ids"], row["completion_ids"], row["label"]) for row in prepared)


def trl_prompt_ids(prompts, tokenizer):
    from trl import GRPOTrainer

    trainer = types.SimpleNamespace(processing_class=tokenizer, _is_vlm=False, environment_factories=None,
                                    chat_template=None, tools=None, chat_template_kwargs={})
    return GRPOTrainer._tokenize_prompts(trainer, prompts)[0]


def macft_sft(rows, tokenizer, train_on_prompt=False, **kwargs):
    examples, _ = tokenize_sft(rows, tokenizer, 4096, train_on_prompt=train_on_prompt, **kwargs)
    return [(e.input_ids, e.loss_mask) for e in examples]


def same_sft(ours, theirs):
    """Equal ids and equal targets; the first token is never a target (nothing predicts it),
    whatever TRL's unused labels[0] holds."""
    assert len(ours) == len(theirs)
    for (ids, mask), (trl_ids, trl_mask) in zip(ours, theirs):
        assert ids == trl_ids
        assert mask[1:] == trl_mask[1:] and mask[0] == 0


# ------------------------------------------------------------------------------- SFT

TEXT_ROWS = [{"text": "The cat sat on the mat."}, {"text": "Already ends with EOS.<|im_end|>"}]
STRING_COMPLETIONS = [{"prompt": "Q: What is 7 + 5?\nA:", "completion": " 12"},
                      {"prompt": "Q: 2+2? A: ", "completion": "4"},  # a token merges across the boundary
                      {"prompt": "Say hi.", "completion": " hi<|im_end|>"}]  # EOS already there
CHAT_COMPLETIONS = [{"prompt": CHAT[:3], "completion": CHAT[3:]},
                    {"prompt": CHAT[:1], "completion": CHAT[1:]}]  # a multi-turn completion


@pytest.mark.parametrize("tokenizer_name", ["tok", "bos_tok"])
def test_text_rows_as_trl_one_eos(request, output_dir, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    ours = macft_sft(TEXT_ROWS, tokenizer)
    same_sft(ours, trl_sft(TEXT_ROWS, tokenizer, output_dir))
    assert ours[1][0].count(tokenizer.eos_token_id) == 1  # no second EOS after one the text has


@pytest.mark.parametrize("tokenizer_name", ["tok", "bos_tok"])
def test_string_prompt_completion_as_trl_no_chat_template(request, output_dir, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    same_sft(macft_sft(STRING_COMPLETIONS, tokenizer), trl_sft(STRING_COMPLETIONS, tokenizer, output_dir))
    same_sft(macft_sft(STRING_COMPLETIONS, tokenizer, train_on_prompt=True),
             trl_sft(STRING_COMPLETIONS, tokenizer, output_dir, completion_only_loss=False))


def test_conversational_prompt_completion_as_trl(tok, output_dir):
    same_sft(macft_sft(CHAT_COMPLETIONS, tok), trl_sft(CHAT_COMPLETIONS, tok, output_dir))
    same_sft(macft_sft(CHAT_COMPLETIONS, tok, train_on_prompt=True),
             trl_sft(CHAT_COMPLETIONS, tok, output_dir, completion_only_loss=False))


def test_messages_ids_as_trl_and_each_assistant_turn_masked_as_trl_masks_a_completion(tok, output_dir):
    rows = [{"messages": CHAT}, {"messages": [{"role": "system", "content": "Be brief."}] + CHAT[:2]}]
    # TRL's default for messages (assistant_only_loss=False) trains on every token.
    same_sft(macft_sft(rows, tok, train_on_prompt=True), trl_sft(rows, tok, output_dir))
    # Assistant-only: TRL needs {% generation %} markers SmolLM2's template lacks; the turn it
    # would train on as a completion is the one macft marks.
    (ids, mask), = macft_sft(rows[:1], tok)
    expected = [0] * len(ids)
    for turn in (1, 3):
        (turn_ids, turn_mask), = trl_sft([{"prompt": CHAT[:turn], "completion": CHAT[turn:turn + 1]}], tok,
                                         output_dir)
        assert ids[:len(turn_ids)] == turn_ids
        expected[:len(turn_ids)] = [e or m for e, m in zip(expected, turn_mask)]
    assert mask == expected


def test_messages_beside_text_uses_messages_as_trl(tok, output_dir, capsys):
    rows = [{"messages": CHAT[:2], "text": "something else"}]
    same_sft(macft_sft(rows, tok, train_on_prompt=True), trl_sft(rows, tok, output_dir))
    assert "the 'text' column is not used" in capsys.readouterr().err


def test_prompt_completion_beside_messages_uses_prompt_completion_as_trl(tok, output_dir):
    # TRL's tokenize_fn takes the prompt/completion path for such a row (mlx-lm-lora looks at
    # prompt/completion first too); whether it appends EOS then depends on which key its
    # is_conversational pops from a set, so the oracle is the row without "messages".
    row = {"prompt": "Q:", "completion": " A"}
    same_sft(macft_sft([{**row, "messages": CHAT[:2]}], tok), trl_sft([row], tok, output_dir))


def test_sharegpt_keys_as_trl_and_role_names_as_unsloth(tok, output_dir, capsys):
    rows = [{"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}]}]
    same_sft(macft_sft(rows, tok, train_on_prompt=True), trl_sft(rows, tok, output_dir))
    # human/gpt: TRL keeps the names ("<|im_start|>human"); macft reads them as Unsloth's
    # standardize_sharegpt does, and says so.
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    assert macft_sft(sharegpt, tok, train_on_prompt=True) == macft_sft(rows, tok, train_on_prompt=True)
    assert "roles human/gpt read as user/assistant, as Unsloth's standardize_sharegpt" in capsys.readouterr().err


def test_mixed_string_and_message_prompt_completion_is_refused(tok):
    with pytest.raises(DataError, match="row 1: 'prompt' and 'completion' must both be strings or both message lists"):
        tokenize_sft([{"prompt": "Hi", "completion": CHAT[1:2]}], tok, 64)


# ------------------------------------------------------------------------------- preference pairs

def macft_pairs(rows, tokenizer, **kwargs):
    examples, _ = tokenize_preference(rows, tokenizer, 4096, **kwargs)
    return [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in examples]


def chat_pair(chosen, rejected, prompt=CHAT[:1]):
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


@pytest.mark.parametrize("tokenizer_name", ["tok", "bos_tok"])
def test_string_pairs_as_trl_no_chat_template(request, output_dir, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    rows = [{"prompt": "Is the sky blue?", "chosen": " Yes.", "rejected": " No.<|im_end|>"},
            {"prompt": "Q: 2+2? A: ", "chosen": "4", "rejected": "5"}]
    assert macft_pairs(rows, tokenizer) == trl_pairs(rows, tokenizer, output_dir)


def test_message_list_pairs_as_trl(tok, output_dir):
    rows = [chat_pair("Paris.", "Lyon."), chat_pair("Rome.", "Milan.", prompt=CHAT[:3])]
    assert macft_pairs(rows, tok) == trl_pairs(rows, tok, output_dir)


def test_implicit_prompt_pairs_as_trl(tok, output_dir, capsys):
    strings = [{"chosen": "Q: Is the sky blue? A: yes", "rejected": "Q: Is the sky blue? A: no"}]
    assert macft_pairs(strings, tok) == trl_pairs(strings, tok, output_dir)
    assert "implicit prompt (strings" in capsys.readouterr().err
    conversations = [{"chosen": CHAT[:2], "rejected": CHAT[:1] + [{"role": "assistant", "content": "Lyon."}]}]
    assert macft_pairs(conversations, tok) == trl_pairs(conversations, tok, output_dir)
    assert "implicit prompt (message lists" in capsys.readouterr().err


def test_string_prompt_with_conversations_holding_it_is_extracted_as_maybe_extract_prompt(tok, output_dir):
    from trl.data_utils import maybe_extract_prompt

    row = {"prompt": "What is the capital of France?", "chosen": CHAT[:2],
           "rejected": CHAT[:1] + [{"role": "assistant", "content": "Lyon."}]}
    extracted = maybe_extract_prompt(row)
    assert macft_pairs([row], tok) == trl_pairs([extracted], tok, output_dir)


def test_system_column_is_read_as_mlx_lm_lora_reads_it(tok, capsys):
    """mlx-lm-lora's DPODataset with renamed columns; its full chosen / rejected sequences."""
    peer = load_peer_datasets()
    row = {"question": "Sky?", "sys": "Be brief.", "good": "Blue.", "bad": "Green."}
    config = types.SimpleNamespace(train_mode="dpo", prompt_feature="question", system_feature="sys",
                                   chosen_feature="good", rejected_feature="bad")
    expected = peer.create_dataset([row], tok, config)[0]
    columns = {"prompt": "question", "system": "sys", "chosen": "good", "rejected": "bad"}
    (prompt, chosen, rejected), = macft_pairs([row], tok, columns=columns)
    assert prompt + chosen == ids_of(expected["chosen"]) and prompt + rejected == ids_of(expected["rejected"])
    assert "with system (chat template" in capsys.readouterr().err


def test_preference_score_is_not_used_and_a_warning_says_so(tok):
    rows = [{"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green.", "preference_score": 0.5}]
    with pytest.warns(UserWarning, match="'preference_score' column is not used: mlx-lm-lora's ORPO weighs"):
        tokenize_preference(rows, tok, 64)


# ------------------------------------------------------------------------------- KTO

def macft_unpaired(rows, tokenizer):
    examples, _ = tokenize_unpaired(rows, tokenizer, 4096)
    return sorted((e.prompt_ids, e.completion_ids, e.label) for e in examples)


def test_unpaired_rows_as_trl(tok, output_dir):
    strings = [{"prompt": "Help me?", "completion": " Of course!", "label": True},
               {"prompt": "Help me?", "completion": " No.", "label": False}]
    assert macft_unpaired(strings, tok) == trl_unpaired(strings, tok, output_dir)
    chats = [{"prompt": CHAT[:1], "completion": CHAT[1:2], "label": True}]
    assert macft_unpaired(chats, tok) == trl_unpaired(chats, tok, output_dir)


def test_pairs_for_kto_are_unpaired_as_trl(tok, output_dir):
    rows = [{"prompt": "Help me?", "chosen": " Of course!", "rejected": " No."}]
    assert macft_unpaired(rows, tok) == trl_unpaired(rows, tok, output_dir)


# ------------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("tokenizer_name", ["tok", "bos_tok"])
def test_prompts_as_trl_grpo(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    prompts = ["What is 7 + 5? Answer with just the number.", CHAT[:3]]
    for prompt in prompts:  # GRPOTrainer decides per batch, from its first prompt
        (example,), _ = tokenize_prompts([{"prompt": prompt}], tokenizer)
        assert example.prompt_ids == trl_prompt_ids([prompt], tokenizer)[0]


def test_prompt_system_column_reaches_reward_functions_only(tok, capsys):
    (example,), _ = tokenize_prompts([{"prompt": "2+2?", "system": "Be terse."}], tok)
    assert example.prompt_ids == tok("2+2?")["input_ids"] and example.columns == {"system": "Be terse."}
    assert "'system' column reaches reward functions only" in capsys.readouterr().err


# ------------------------------------------------------------------------------- mlx-lm-lora's column names

def load_peer_datasets():
    """mlx-lm-lora's trainer/datasets.py, loaded from its file (it needs only transformers)."""
    if not PEER_DATASETS.is_file():
        pytest.skip("mlx-lm-lora is not installed in .venv-peer")
    spec = importlib.util.spec_from_file_location("mlx_lm_lora_datasets", PEER_DATASETS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ids_of(encoded):
    # With a transformers tokenizer, apply_chat_template(tokenize=True) returns a dict.
    return list(encoded["input_ids"]) if isinstance(encoded, Mapping) else list(encoded)


def test_text_feature_as_mlx_lm_lora(tok):
    peer = load_peer_datasets()
    rows = [{"body": "hello there", "text": "not this"}]
    dataset = peer.create_dataset(rows, tok, types.SimpleNamespace(train_mode="sft", text_feature="body"))
    ((ids, _),) = macft_sft(rows, tok, columns={"text": "body"})
    assert ids == dataset.process(dataset[0])


def test_chat_feature_as_mlx_lm_lora(tok):
    peer = load_peer_datasets()
    rows = [{"dialogue": CHAT}]
    dataset = peer.create_dataset(rows, tok, types.SimpleNamespace(train_mode="sft", chat_feature="dialogue"))
    ((ids, _),) = macft_sft(rows, tok, columns={"messages": "dialogue"})
    assert ids == dataset.process(dataset[0])


def test_answer_and_type_features_as_mlx_lm_lora(tok):
    peer = load_peer_datasets()
    rows = [{"question": "2+2?", "solution": 4, "kind": "math"}]
    config = types.SimpleNamespace(train_mode="grpo", prompt_feature="question", answer_feature="solution",
                                   type_feature="kind")
    _, _, prompt, answer, kind = peer.create_dataset(rows, tok, config)[0]
    (example,), _ = tokenize_prompts(rows, tok, columns={"prompt": "question", "answer": "solution", "type": "kind"})
    assert (example.prompt, str(example.columns["answer"]), example.columns["type"]) == (prompt, answer, kind)


def test_renaming_through_load_rows_and_the_load_functions(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "Q:", "reply": " A"}) + "\n")
    columns = {"prompt": "question", "completion": "reply"}
    assert load_rows(path, columns=columns) == [{"prompt": "Q:", "completion": " A"}]
    examples, _ = load_sft_dataset(path, tok, 64, columns=columns)
    assert examples == tokenize_sft([{"prompt": "Q:", "completion": " A"}], tok, 64)[0]
    # Renamed twice with the same mapping (load_rows, then a tokenize function): renamed once.
    assert tokenize_sft(load_rows(path, columns=columns), tok, 64, columns=columns)[0] == examples
    (prompt,), _ = load_prompt_dataset(path, tok, columns={"prompt": "question"})
    assert prompt.prompt == "Q:" and prompt.columns == {"reply": " A"}


def test_a_named_column_missing_names_column_setting_and_line(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError) as info:
        tokenize_prompts(load_rows(path), tok, columns={"prompt": "question"})
    message = str(info.value)
    assert f"{path}:2: no column 'question'" in message and "dataset_columns {'prompt': 'question'}" in message
    assert "prompt_feature" in message and "\n" not in message
    with pytest.raises(DataError, match="dataset_columns must map column names to column names"):
        load_rows(path, columns={"prompt": 3})


# ------------------------------------------------------------------------------- the format line

def test_each_split_says_its_format(tmp_path, tok, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in STRING_COMPLETIONS[:2]))
    (data / "valid.jsonl").write_text(json.dumps({"messages": CHAT[:2]}) + "\n" + json.dumps({"text": "x y"}) + "\n")
    load_sft_dataset(data, tok, 64)
    load_sft_dataset(data, tok, 64, split="valid")
    lines = capsys.readouterr().err.splitlines()
    assert f"{data / 'train.jsonl'}: 2 rows, format prompt/completion (strings, as written, no chat template" in lines[0]
    assert lines[1].startswith(f"{data / 'valid.jsonl'}: 2 rows, formats messages (chat template, as TRL): 1 rows; "
                               "text (")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the format line is no warning
        tokenize_prompts([{"prompt": "hi"}], tok)
    assert "<rows>: 1 rows, format prompt (string, as written, no chat template, as TRL)" in capsys.readouterr().err
