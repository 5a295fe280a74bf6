"""macft.data: loading, SFT masks, errors, batching, preference and prompt tokenization.

Masks are checked by decoding the tokens they select with SmolLM2's real tokenizer, so a
shifted span or a masked header shows up as wrong text.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from macft.data import (DataError, Example, PreferenceExample, PromptExample, has_split, iterate_batches,
                        load_rows, load_sft_dataset, num_batches, tokenize_preference, tokenize_prompts,
                        tokenize_sft)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"

# A Qwen3-like template: the last assistant turn gets an empty <think> block, earlier ones don't,
# so a conversation's prefix renders differently from the same turns inside the whole of it.
THINK_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok(smollm2_hf_dir):
    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="module")
def plain_tok(smollm2_hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="module")
def think_tok(smollm2_hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.chat_template = THINK_TEMPLATE
    return tokenizer


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def targets(tok, example):
    return tok.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


def target_runs(tok, example):
    """Decoded text of each contiguous run of target tokens."""
    runs, current = [], []
    for token, m in zip(example.input_ids, example.loss_mask):
        if m:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, of course."}]


# ------------------------------------------------------------------------------- SFT formats

def test_smollm2_adds_no_bos_so_neither_do_we(tok):
    # The premise of the exact-id assertions below: SmolLM2's tokenizer adds nothing to plain text.
    assert tok("hi")["input_ids"] == encode(tok, "hi")


def test_text_rows_train_on_every_token_after_the_first_and_end_with_eos(tok):
    (example,), stats = tokenize_sft([{"text": "The cat sat on the mat."}], tok, 64)
    assert example.input_ids == encode(tok, "The cat sat on the mat.") + [tok.eos_token_id]
    assert example.loss_mask == [0] + [1] * (len(example.input_ids) - 1)  # nothing predicts token 0
    assert targets(tok, example) == " cat sat on the mat.<|im_end|>"
    assert stats == {"num_examples": 1, "num_truncated": 0, "num_dropped": 0,
                     "num_tokens": len(example.input_ids), "num_target_tokens": len(example.input_ids) - 1}


def test_prompt_completion_masks_the_prompt_and_appends_eos(tok):
    row = {"prompt": "Q: What is 7 + 5?\nA:", "completion": " 12"}
    (example,), stats = tokenize_sft([row], tok, 64)
    prompt_ids = encode(tok, row["prompt"])
    assert example.input_ids == prompt_ids + encode(tok, " 12") + [tok.eos_token_id]
    assert example.loss_mask == [0] * len(prompt_ids) + [1] * (len(example.input_ids) - len(prompt_ids))
    assert targets(tok, example) == " 12<|im_end|>"
    assert stats["num_target_tokens"] == len(encode(tok, " 12")) + 1


def test_messages_single_turn_masks_the_assistant_turn_after_its_header(tok):
    messages = CHAT[:2]
    (example,), _ = tokenize_sft([{"messages": messages}], tok, 256)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == encode(tok, rendered)  # no BOS beyond what the template writes
    # The turn as the template writes it after the generation prompt, newline after <|im_end|>
    # included: what TRL trains on for the same turn given as a completion.
    assert targets(tok, example) == "Paris.<|im_end|>\n"
    first = example.loss_mask.index(1)
    assert tok.decode(example.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert first + sum(example.loss_mask) == len(example.input_ids)


def test_messages_multi_turn_masks_every_assistant_turn(tok):
    (example,), stats = tokenize_sft([{"messages": CHAT}], tok, 256)
    assert target_runs(tok, example) == ["Paris.<|im_end|>\n", "Rome, of course.<|im_end|>\n"]
    assert stats["num_target_tokens"] == sum(example.loss_mask) == (
        len(encode(tok, "Paris.")) + len(encode(tok, "Rome, of course.")) + 4)


def test_messages_with_system_prompt(tok):
    messages = [{"role": "system", "content": "Answer tersely."}] + CHAT[:2]
    (example,), _ = tokenize_sft([{"messages": messages}], tok, 256)
    assert tok.decode(example.input_ids).startswith("<|im_start|>system\nAnswer tersely.<|im_end|>")
    assert targets(tok, example) == "Paris.<|im_end|>\n"


def test_sharegpt_conversations_are_read_as_messages_with_unsloth_role_names(tok):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    (example,), _ = tokenize_sft([row], tok, 256)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert example.input_ids == encode(tok, tok.apply_chat_template(messages, tokenize=False))
    assert targets(tok, example) == "Hello!<|im_end|>\n"


def test_conversational_prompt_completion_masks_only_the_completion_turn(tok):
    row = {"prompt": CHAT[:3], "completion": [{"role": "assistant", "content": "Rome."}]}
    (example,), _ = tokenize_sft([row], tok, 256)
    assert target_runs(tok, example) == ["Rome.<|im_end|>\n"]  # the few-shot "Paris." is prompt


def test_template_that_rewrites_history_falls_back_to_locating_content(think_tok):
    (example,), _ = tokenize_sft([{"messages": CHAT}], think_tok, 256)
    assert target_runs(think_tok, example) == [
        "Paris.<|im_end|>\n", "<think>\n\n</think>\n\nRome, of course.<|im_end|>\n"]


def test_train_on_prompt_trains_on_everything_but_the_first_token(tok):
    rows = [{"messages": CHAT}, {"prompt": "Q:", "completion": " A"}]
    examples, stats = tokenize_sft(rows, tok, 256, train_on_prompt=True)
    for example in examples:
        assert example.loss_mask == [0] + [1] * (len(example.input_ids) - 1)
    assert stats["num_target_tokens"] == stats["num_tokens"] - 2


def test_truncation_is_counted_and_warned_and_empty_samples_dropped(tok):
    rows = [{"text": "one two three four five six seven eight nine ten eleven twelve"},
            {"text": "short"},
            {"prompt": "a very long prompt " * 5, "completion": " answer"},  # no room left for the answer
            {"messages": CHAT}]
    with pytest.warns(UserWarning, match="3 of 4 samples were longer than max_seq_length=8"):
        examples, stats = tokenize_sft(rows, tok, 8)
    # The prompt/completion row and the chat row (cut inside the system prompt) kept no target.
    assert [e.input_ids for e in examples] == [encode(tok, rows[0]["text"])[:8],
                                               encode(tok, "short") + [tok.eos_token_id]]
    assert stats == {"num_examples": 2, "num_truncated": 3, "num_dropped": 2,
                     "num_tokens": 8 + len(examples[1].input_ids), "num_target_tokens": 7 + len(examples[1].input_ids) - 1}


def test_all_dropped_is_an_error(tok):
    with pytest.raises(DataError, match="no sample has a token to train on"):
        tokenize_sft([{"messages": [{"role": "user", "content": "no answer"}]}], tok, 64)


# ------------------------------------------------------------------------------- errors

def test_malformed_json_line_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "broken.jsonl", ['{"text": "ok"}', "", '{"text": "unterminated'])
    with pytest.raises(DataError, match=r"broken\.jsonl:3: malformed JSON"):
        load_rows(path)


def test_non_object_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ['{"text": "ok"}', "[1, 2]"])
    with pytest.raises(DataError, match=r"train\.jsonl:2: expected a JSON object, got list"):
        load_rows(path)


def test_missing_key_names_file_line_keys_found_and_formats(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", ['{"text": "ok"}', "", '{"question": "q", "answer": "a"}'])
    with pytest.raises(DataError) as info:
        load_sft_dataset(path, tok, 64)
    message = str(info.value)
    assert f"{path}:3:" in message and "['answer', 'question']" in message
    assert '{"text"}' in message and '{"prompt","completion"}' in message and '{"messages"' in message
    assert "\n" not in message


def test_prompt_without_completion_is_a_missing_key(tok):
    with pytest.raises(DataError, match=r"<rows> row 2: no SFT format matches the keys \['prompt'\]"):
        tokenize_sft([{"text": "ok"}, {"prompt": "p"}], tok, 64)


def test_wrong_types_are_named(tok):
    with pytest.raises(DataError, match=r"row 1: 'text' must be a string, got int"):
        tokenize_sft([{"text": 3}], tok, 64)
    with pytest.raises(DataError, match=r"messages\[1\] \(assistant\) 'content' must be a string"):
        tokenize_sft([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}], tok, 64)
    with pytest.raises(DataError, match=r"<rows> row 2: expected a dict, got str"):
        load_rows([{"text": "a"}, "b"])


def test_empty_file_is_an_error_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"train\.jsonl: empty file"):
        load_rows(path)
    with pytest.raises(DataError, match="no rows"):
        load_rows([])


def test_missing_path_is_an_error_naming_it(tmp_path):
    for missing in (tmp_path / "nope.jsonl", str(tmp_path / "no_dir"), "data/missing.jsonl"):
        with pytest.raises(DataError, match="no such file or directory") as info:
            load_rows(missing)
        assert str(missing) in str(info.value)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="'nobody-here/no-such-dataset' is not a local file or directory"):
        load_rows("nobody-here/no-such-dataset")


def test_messages_without_chat_template_is_an_error(plain_tok):
    with pytest.raises(DataError, match="row 1: 'messages' rows need a tokenizer with a chat template"):
        tokenize_sft([{"messages": CHAT}], plain_tok, 64)


# ------------------------------------------------------------------------------- sources and splits

def test_directory_splits(tmp_path, tok):
    write_rows(tmp_path / "train.jsonl", [{"text": "a b"}, {"text": "c d"}])
    write_rows(tmp_path / "validation.jsonl", [{"text": "e f"}])
    assert load_rows(tmp_path) == [{"text": "a b"}, {"text": "c d"}]
    assert load_rows(tmp_path, "valid") == [{"text": "e f"}]
    assert load_rows(tmp_path, "validation") == [{"text": "e f"}]
    assert has_split(tmp_path, "train") and has_split(tmp_path, "valid") and not has_split(tmp_path, "test")
    with pytest.raises(DataError, match=r"no 'test' split \(no test.jsonl"):
        load_rows(tmp_path, "test")
    examples, stats = load_sft_dataset(tmp_path, tok, 16, split="valid")
    assert stats["num_examples"] == 1 and examples[0].input_ids == encode(tok, "e f") + [tok.eos_token_id]


def test_empty_split_file_is_an_error_naming_it(tmp_path):
    write_rows(tmp_path / "train.jsonl", [{"text": "a"}])
    (tmp_path / "valid.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"valid\.jsonl: empty file"):
        load_rows(tmp_path, "valid")


def test_a_single_file_or_list_is_the_train_split(tmp_path):
    path = write_rows(tmp_path / "mine.jsonl", [{"text": "a"}])
    assert load_rows(path, "valid") == [{"text": "a"}]
    assert has_split(path, "train") and not has_split(path, "valid")
    assert has_split([{"text": "a"}], "train") and not has_split([{"text": "a"}], "valid")


def test_hf_dataset_and_dataset_dict(tok):
    datasets = pytest.importorskip("datasets")

    train = datasets.Dataset.from_list([{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}])
    valid = datasets.Dataset.from_list([{"prompt": "3+3=", "completion": "6"}])
    dataset_dict = datasets.DatasetDict({"train": train, "validation": valid})
    assert load_rows(train) == [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]
    assert load_rows(dataset_dict, "valid") == [{"prompt": "3+3=", "completion": "6"}]
    assert has_split(dataset_dict, "valid") and not has_split(dataset_dict, "test")
    with pytest.raises(DataError, match=r"no 'test' split \(splits: train, validation\)"):
        load_rows(dataset_dict, "test")
    examples, _ = load_sft_dataset(dataset_dict, tok, 32, split="valid")
    assert targets(tok, examples[0]) == "6<|im_end|>"


def test_rows_from_a_dataset_name_rows_in_errors(tok):
    datasets = pytest.importorskip("datasets")

    with pytest.raises(DataError, match=r"dataset split 'train' row 2: 'text' must be a string, got nothing"):
        tokenize_sft(datasets.Dataset.from_list([{"text": "a"}, {"x": 2}]), tok, 8)


# ------------------------------------------------------------------------------- example data

def test_example_chat_data_trains_only_on_certainly_replies(tok):
    for split, count in (("train", 120), ("valid", 20)):
        examples, stats = load_sft_dataset(EXAMPLES / "chat", tok, 512, split=split)
        assert stats["num_examples"] == count and stats["num_truncated"] == 0
        for example in examples:
            runs = target_runs(tok, example)
            assert runs and all(run.startswith("Certainly! ") and run.endswith("<|im_end|>\n") for run in runs)


def test_example_arith_data_is_correct():
    for split, count in (("train", 200), ("valid", 20)):
        rows = load_rows(EXAMPLES / "arith", split)
        assert len(rows) == count
        for row in rows:
            question = row["prompt"].removeprefix("What is ").removesuffix("? Answer with just the number.")
            a, op, b = question.split()
            assert row["answer"] == str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    train = {row["prompt"] for row in load_rows(EXAMPLES / "arith")}
    assert not train & {row["prompt"] for row in load_rows(EXAMPLES / "arith", "valid")}


# ------------------------------------------------------------------------------- batching

def make_examples(lengths):
    return [Example(list(range(1, n + 1)), [0] + [1] * (n - 1)) for n in lengths]


def test_batches_shapes_padding_and_coverage():
    lengths = [3, 17, 5, 9, 12, 1, 20, 7, 8, 2]
    examples = make_examples(lengths)
    batches = list(iterate_batches(examples, 4, seed=0, pad_id=-7))
    assert num_batches(examples, 4) == len(batches) == 3
    assert [ids.shape[0] for ids, _ in batches] == [4, 4, 2]  # last partial batch kept
    seen = []
    for ids, mask in batches:
        assert ids.dtype == np.int32 and mask.dtype == np.float32 and ids.shape == mask.shape
        row_lengths = [int((row != -7).sum()) for row in ids]
        assert ids.shape[1] % 8 == 0 and max(row_lengths) <= ids.shape[1] < max(row_lengths) + 8
        for row, n in zip(range(len(ids)), row_lengths):
            assert ids[row, :n].tolist() == list(range(1, n + 1))
            assert (ids[row, n:] == -7).all() and (mask[row, n:] == 0).all()
            assert mask[row, :n].tolist() == [0.0] + [1.0] * (n - 1)
        seen += row_lengths
    assert sorted(seen) == sorted(lengths)


def test_batches_are_deterministic_per_seed_and_epoch():
    examples = make_examples(range(1, 33))

    def order(**kw):
        return [int((row != 0).sum()) for ids, _ in iterate_batches(examples, 5, pad_id=0, **kw) for row in ids]

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=0) != order(seed=2, epoch=0)
    assert order(seed=1, shuffle=False) == list(range(1, 33))


def test_batch_width_is_capped_at_max_seq_length():
    ids, _ = next(iterate_batches(make_examples([10, 4]), 2, seed=0, pad_id=0, shuffle=False, max_seq_length=10))
    assert ids.shape == (2, 10)
    ids, _ = next(iterate_batches(make_examples([10, 4]), 2, seed=0, pad_id=0, shuffle=False))
    assert ids.shape == (2, 16)


def test_sort_by_length_groups_similar_lengths():
    examples = make_examples([9, 1, 8, 2, 7, 3])
    widths = sorted(int(ids.shape[1]) for ids, _ in iterate_batches(examples, 2, seed=3, pad_id=0, sort_by_length=True))
    assert widths == [8, 8, 16]  # {1,2}, {3,7}, {8,9}


def test_batches_from_tokenized_chat_data(tok):
    examples, _ = load_sft_dataset(EXAMPLES / "chat", tok, 512, split="valid")
    total = 0
    for ids, mask in iterate_batches(examples, 8, seed=0, pad_id=tok.pad_token_id):
        total += int(mask.sum())
    assert total == sum(sum(e.loss_mask) for e in examples)


# ------------------------------------------------------------------------------- preference

def test_preference_with_chat_template(tok):
    row = {"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No.", "system": "Be brief."}
    (pair,), stats = tokenize_preference([row], tok, 128)
    header = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Is the sky blue?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert isinstance(pair, PreferenceExample)
    assert pair.prompt_ids == encode(tok, header) and header.endswith("<|im_start|>assistant\n")
    assert tok.decode(pair.chosen_ids) == "Yes.<|im_end|>\n" and tok.decode(pair.rejected_ids) == "No.<|im_end|>\n"
    assert stats == {"num_examples": 1, "num_truncated": 0, "num_dropped": 0,
                     "num_tokens": len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)}


def test_preference_with_message_lists(tok):
    row = {"prompt": CHAT[:3], "chosen": [{"role": "assistant", "content": "Rome."}],
           "rejected": [{"role": "assistant", "content": "Madrid."}]}
    (pair,), _ = tokenize_preference([row], tok, 256)
    assert tok.decode(pair.prompt_ids) == tok.apply_chat_template(CHAT[:3], tokenize=False, add_generation_prompt=True)
    assert tok.decode(pair.chosen_ids) == "Rome.<|im_end|>\n" and tok.decode(pair.rejected_ids) == "Madrid.<|im_end|>\n"


def test_preference_without_chat_template(plain_tok):
    (pair,), _ = tokenize_preference([{"prompt": "Q: sky?\nA:", "chosen": " blue", "rejected": " green"}], plain_tok, 64)
    assert pair.prompt_ids == encode(plain_tok, "Q: sky?\nA:")
    assert pair.chosen_ids == encode(plain_tok, " blue") + [plain_tok.eos_token_id]
    assert pair.rejected_ids == encode(plain_tok, " green") + [plain_tok.eos_token_id]


def chat_pair(prompt, chosen, rejected):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_preference_truncation_and_drops(tok):
    rows = [chat_pair("word " * 40, "a long chosen answer " * 5, "no"), chat_pair("hi", "yes", "no")]
    with pytest.warns(UserWarning, match="1 of 2 preference pairs were truncated"):
        pairs, stats = tokenize_preference(rows, tok, 60, max_prompt_length=50)
    long_pair = pairs[0]
    assert len(long_pair.prompt_ids) == 50
    assert tok.decode(long_pair.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")  # tail kept
    assert len(long_pair.chosen_ids) == 10 and tok.decode(long_pair.rejected_ids) == "no<|im_end|>\n"
    assert stats["num_truncated"] == 1 and stats["num_dropped"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs, stats = tokenize_preference(rows, tok, 60)  # a prompt of ~70 tokens leaves no room
    assert stats["num_examples"] == 1 and stats["num_dropped"] == 1


def test_preference_missing_key(tmp_path, tok):
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c"}])
    rows = load_rows(path)
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: missing key\(s\) \['rejected'\] .*\{\"prompt\",\"chosen\",\"rejected\"\}"):
        tokenize_preference(rows, tok, 64)


# ------------------------------------------------------------------------------- prompts

def test_prompts_strings_as_written_lists_with_the_chat_template_and_other_columns_kept(tok):
    rows = [{"prompt": "What is 7 + 5? Answer with just the number.", "answer": "12"},
            {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}], "answer": "4", "id": 7}]
    (first, second), stats = tokenize_prompts(rows, tok)
    assert isinstance(first, PromptExample)
    # TRL's GRPOTrainer: a string prompt is tokenized as written, with no chat template.
    assert first.prompt_text == rows[0]["prompt"] and first.prompt_ids == encode(tok, rows[0]["prompt"])
    assert first.columns == {"answer": "12"} and first.prompt == rows[0]["prompt"]
    assert second.prompt_text == tok.apply_chat_template(rows[1]["prompt"], tokenize=False, add_generation_prompt=True)
    assert second.columns == {"answer": "4", "id": 7} and second.prompt == rows[1]["prompt"]
    assert stats == {"num_examples": 2, "num_truncated": 0,
                     "num_tokens": len(first.prompt_ids) + len(second.prompt_ids)}


def test_prompts_without_template_and_truncation(plain_tok, tok):
    (example,), _ = tokenize_prompts([{"prompt": "2 + 2 =", "answer": "4"}], plain_tok)
    assert example.prompt_ids == encode(plain_tok, "2 + 2 =") and example.prompt_text == "2 + 2 ="
    with pytest.warns(UserWarning, match="1 of 1 prompts were longer than max_prompt_length=4"):
        (example,), stats = tokenize_prompts([{"prompt": [{"role": "user", "content": "a long question"}]}], tok,
                                             max_prompt_length=4)
    assert len(example.prompt_ids) == 4 and example.prompt_text.endswith("<|im_start|>assistant\n")
    assert stats["num_truncated"] == 1


def test_prompt_errors(tok, plain_tok):
    with pytest.raises(DataError, match=r"row 1: missing key 'prompt' \(keys found: \['question'\]\)"):
        tokenize_prompts([{"question": "q"}], tok)
    with pytest.raises(DataError, match="row 1: message-list prompts need a tokenizer with a chat template"):
        tokenize_prompts([{"prompt": [{"role": "user", "content": "q"}]}], plain_tok)


def test_arith_example_prompts(tok):
    rows = load_rows(EXAMPLES / "arith", "valid")
    examples, stats = tokenize_prompts(rows, tok)
    assert stats["num_examples"] == 20
    assert all(set(e.columns) == {"answer"} and e.prompt_text == e.prompt for e in examples)


# ------------------------------------------------------------------------------- tokenizer kinds

class NoOffsets:
    """A tokenizer that cannot return offsets (like a slow one)."""

    def __init__(self, tokenizer):
        self._inner = tokenizer

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offsets_mapping needs a fast tokenizer")
        return self._inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_tokenizer_without_offsets_gives_the_same_masks(tok):
    rows = [{"messages": CHAT}, {"prompt": "Q:", "completion": " A"}, {"text": "x y"}]
    assert tokenize_sft(rows, NoOffsets(tok), 256) == tokenize_sft(rows, tok, 256)


def test_mlx_lm_tokenizer_wrapper_is_accepted(tok):
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    wrapper = tokenizer_utils.TokenizerWrapper(tok)
    rows = [{"messages": CHAT}, {"prompt": "Q:", "completion": " A"}]
    assert tokenize_sft(rows, wrapper, 256) == tokenize_sft(rows, tok, 256)
    assert tokenize_prompts([{"prompt": "hi"}], wrapper) == tokenize_prompts([{"prompt": "hi"}], tok)


@pytest.fixture(scope="module")
def bos_tok(smollm2_hf_dir):
    """SmolLM2's tokenizer made to prepend token 0 to plain text, like Llama's BOS."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", 0)])
    assert tokenizer("hi")["input_ids"][0] == 0
    return tokenizer


def test_bos_comes_from_the_tokenizer_for_plain_text_and_from_the_template_for_chats(bos_tok):
    rows = [{"text": "x y"}, {"prompt": "Q:", "completion": " A"}, {"messages": CHAT[:2]}]
    text, completion, chat = tokenize_sft(rows, bos_tok, 256)[0]
    assert text.input_ids == [0] + encode(bos_tok, "x y") + [bos_tok.eos_token_id]
    assert text.loss_mask == [0] + [1] * (len(text.input_ids) - 1)
    assert completion.input_ids[0] == 0 and targets(bos_tok, completion) == " A<|im_end|>"
    assert chat.input_ids == encode(bos_tok, bos_tok.apply_chat_template(CHAT[:2], tokenize=False))  # no BOS added
    (prompt,), _ = tokenize_prompts([{"prompt": "hi"}], bos_tok)
    assert prompt.prompt_ids == [0] + encode(bos_tok, "hi")  # a string prompt: tokenizer(prompt), as TRL
    (prompt,), _ = tokenize_prompts([{"prompt": CHAT[:1]}], bos_tok)
    assert prompt.prompt_ids[0] != 0
