"""Inputs that must fail clearly, or be handled fast, instead of going wrong (issue 16, items 4 and 5).

- A data file that is not UTF-8 is a DataError naming the file, the line and the byte offset.
- A reward function returning a non-number, an unknown built-in reward name, and an exception
  inside a user's reward file each give one message naming the function, its file and line.
- An over-long row is cut before it is tokenized, and truncation keeps exactly the tokens it kept
  when the row was tokenized whole, for every row format.
"""

import json
import time
import traceback
import warnings

import numpy as np
import pytest
from transformers import AutoTokenizer

from macft import data
from macft.data import (DataError, load_rows, load_sft_dataset, tokenize_preference, tokenize_prompts, tokenize_sft,
                        tokenize_unpaired)
from macft.rewards import BUILTINS, RewardError, load_reward_functions, score_completions


@pytest.fixture(scope="module")
def tok(smollm2_hf_dir):
    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="module")
def plain_tok(smollm2_hf_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.chat_template = None
    return tokenizer


# ----------------------------------------------------------------------------- 4a: non-UTF-8 data


def test_a_non_utf8_byte_names_file_line_column_and_offset(tmp_path):
    # Enough lines before the bad one that it lies far past the text reader's first block.
    good = [json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(3000)]
    bad = b'{"text": "caf\xe9 au lait"}\n'  # Latin-1 e-acute: not UTF-8
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(good) + b"\n" + bad + good[0])
    offset = sum(map(len, good)) + 1 + bad.index(b"\xe9")
    with pytest.raises(DataError) as raised:
        load_rows(path)
    assert str(raised.value) == (f"{path}:3002: not UTF-8 text: byte 0xe9 at column 14 (byte offset {offset} in "
                                 "the file) cannot be decoded (invalid continuation byte); save the file as UTF-8")
    with pytest.raises(DataError, match=r"train\.jsonl:3002: not UTF-8"):
        load_rows(tmp_path, "train")  # the same through a data directory


def test_a_utf16_file_is_named_as_such_and_a_utf8_bom_is_accepted(tmp_path):
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text('{"text": "hi"}\n', encoding="utf-16")  # what Windows PowerShell's > writes
    with pytest.raises(DataError, match=r"utf16\.jsonl: the file is UTF-16 .*save it as UTF-8"):
        load_rows(utf16)
    bom = tmp_path / "bom.jsonl"
    bom.write_text('{"text": "hi"}\n{"text": "there"}\n', encoding="utf-8-sig")
    assert load_rows(bom) == [{"text": "hi"}, {"text": "there"}]


# ----------------------------------------------------------------------------- 4b-d: reward functions

PROMPTS = ["What is 1 + 1?"] * 4
COMPLETIONS = ["2", "3", "two", "2."]


def reward_file(tmp_path, body: str, name="my_reward.py"):
    path = tmp_path / name
    path.write_text(body)
    return path


def score(spec, **columns):
    return score_completions(load_reward_functions([spec]), PROMPTS, COMPLETIONS, columns)


def test_numbers_and_none_are_rewards(tmp_path):
    path = reward_file(tmp_path, "import numpy as np\n\n"
                                 "def mixed_reward(prompts, completions, **kwargs):\n"
                                 "    return [None, 1, np.float32(0.5), True]\n")
    total, per_function = score(str(path))
    assert total.tolist() == [0.0, 1.0, 0.5, 1.0]  # None: not applicable, 0 in the sum
    assert np.isnan(per_function["mixed_reward"][0]) and per_function["mixed_reward"][1:].tolist() == [1.0, 0.5, 1.0]
    total, _ = score_completions(load_reward_functions([lambda prompts, completions, **kw: np.arange(4.0)]),
                                 PROMPTS, COMPLETIONS, {})
    assert total.tolist() == [0.0, 1.0, 2.0, 3.0]  # a numpy array of scores is fine too


@pytest.mark.parametrize("value, shown", [('"1.0"', "'1.0' (a str)"), ("[1.0]", "[1.0] (a list)"),
                                          ("{'score': 1}", "{'score': 1} (a dict)")])
def test_a_reward_that_is_not_a_number_names_function_file_value_and_index(tmp_path, value, shown):
    path = reward_file(tmp_path, "def graded_reward(prompts, completions, **kwargs):\n"
                                 f"    return [0.0, 1.0, {value}, 0.0]\n")
    with pytest.raises(RewardError) as raised:
        score(str(path))
    assert str(raised.value) == (f"reward function 'graded_reward' in {path} returned {shown} for sample 2 "
                                 "(prompt: 'What is 1 + 1?'; completion: 'two'): a reward must be a number, or None "
                                 'for "not applicable"')


def test_an_unknown_builtin_name_lists_the_builtins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError) as raised:
        load_reward_functions(["accurracy"])
    assert str(raised.value) == ("--reward-fn accurracy: neither a file nor a built-in reward function (no file "
                                 "accurracy; the built-ins are accuracy, numeric, format, length_penalty, "
                                 "r1_accuracy_reward_func, r1_int_reward_func, r1_strict_format_reward_func, "
                                 "r1_soft_format_reward_func, r1_count_xml); did you mean 'accuracy'?")
    with pytest.raises(RewardError, match=r"^--reward-fn missing\.py: neither a file nor a built-in .*"
                                          + ", ".join(BUILTINS) + r"\)$"):
        load_reward_functions(["missing.py"])


def test_an_exception_in_a_reward_file_shows_its_file_and_line_not_macft_internals(tmp_path):
    path = reward_file(tmp_path, "def ratio(x):\n"
                                 "    return 1 / x\n"
                                 "\n\n"
                                 "def correctness_reward(prompts, completions, answer, **kwargs):\n"
                                 "    return [ratio(len(c) - len(c)) for c in completions]\n")
    with pytest.raises(RewardError) as raised:
        score(str(path), answer=["2"] * 4)
    assert str(raised.value) == ("reward function 'correctness_reward' raised ZeroDivisionError: division by zero "
                                 f"(first prompt of the batch: 'What is 1 + 1?'; at {path}:2 in ratio: return 1 / x)")
    # The traceback of the user's error starts in the user's file: no frames of macft before it.
    frames = traceback.extract_tb(raised.value.__cause__.__traceback__)
    assert {f.filename for f in frames} == {str(path)} and [f.lineno for f in frames][-1] == 2


def test_a_wrong_signature_points_at_the_definition(tmp_path):
    # Reward functions are called by keyword (as TRL does): one without **kwargs gets only what it names,
    # and a parameter that no column fills is named, with its definition, before the call.
    path = reward_file(tmp_path, "\n\ndef strict_reward(prompts, completions):\n    return [1.0] * len(completions)\n")
    assert score(str(path), answer=["2"] * 4)[0].tolist() == [1.0] * 4
    path.write_text("\n\ndef strict_reward(prompts, completions, solution):\n    return [1.0] * len(completions)\n")
    with pytest.raises(RewardError) as raised:
        score(str(path), answer=["2"] * 4)
    assert str(raised.value).startswith(f"reward function 'strict_reward' (defined at {path}:3) needs the argument "
                                        "'solution', which nothing gives: no dataset column is named 'solution' "
                                        "(the columns are: answer;")


def test_an_exception_while_importing_a_reward_file_names_the_line(tmp_path, monkeypatch):
    path = reward_file(tmp_path, "import math\n\nLIMIT = math.sqrt(-1)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError) as raised:
        load_reward_functions(["my_reward.py"])  # a relative path, as typed on a command line
    assert str(raised.value) == ("--reward-fn my_reward.py: importing it failed: ValueError: math domain error "
                                 f"(at {path.resolve()}:3: LIMIT = math.sqrt(-1))")


# ----------------------------------------------------------------------------- 5: over-long rows


def long_text(words: int, seed: int = 0) -> str:
    """Varied text: words, numbers, punctuation, newlines and a long run without spaces."""
    rng = np.random.default_rng(seed)
    vocabulary = ["the", "model", "learns", "tokens", "quickly", "12345", "3.14", "(x)", "don't", "naïve", "東京",
                  "\n", "\n\n", "  ", "—", "state-of-the-art", "https://example.com/a?b=c", "x" * 300, "0" * 50]
    return " ".join(rng.choice(vocabulary, size=words))


class Recording:
    """A tokenizer that records the longest text it was asked to tokenize."""

    def __init__(self, inner):
        self._inner, self.longest = inner, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self._inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def tokenize_all_formats(tokenizer, max_length: int):
    """Every tokenizer of macft.data on rows whose text fields are far over max_length tokens."""
    long = long_text(6000)
    short = "What is the capital of France?"
    chat_long_answer = [{"role": "user", "content": short}, {"role": "assistant", "content": long}]
    chat_long_question = [{"role": "user", "content": long}, {"role": "assistant", "content": "Paris."}]
    sft_rows = [{"text": long}, {"prompt": short, "completion": long}, {"prompt": long, "completion": " Paris."},
                {"messages": chat_long_answer}, {"messages": chat_long_question},
                {"prompt": chat_long_answer[:1], "completion": chat_long_answer[1:]}, {"text": short}]
    pairs = [{"prompt": short, "chosen": long, "rejected": "Lyon."},
             {"prompt": long, "chosen": "Paris.", "rejected": long},
             {"prompt": short, "chosen": "Paris.", "rejected": "Lyon."}]
    unpaired = [{"prompt": long, "completion": "Paris.", "label": True},
                {"prompt": short, "completion": long, "label": False}]
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings: counted in the stats compared here
        for train_on_prompt in (False, True):
            results.append(tokenize_sft(sft_rows, tokenizer, max_length, train_on_prompt))
        for max_prompt_length in (None, max_length // 2):
            results.append(tokenize_preference(pairs, tokenizer, max_length, max_prompt_length))
            results.append(tokenize_unpaired(unpaired, tokenizer, max_length, max_prompt_length))
        results.append(tokenize_prompts([{"prompt": long, "answer": "7"}, {"prompt": short}], tokenizer, max_length))
    return results, len(long)


def test_cutting_before_tokenizing_keeps_exactly_the_same_tokens(tok, monkeypatch):
    def run(chars_per_token):
        monkeypatch.setattr(data, "_CHARS_PER_TOKEN", chars_per_token)
        recording = Recording(tok)
        results, text_length = tokenize_all_formats(recording, max_length=48)
        return results, recording.longest, text_length

    whole, longest_whole, text_length = run(10 ** 9)  # never cut: every text is tokenized whole
    assert longest_whole >= text_length
    # 8 characters a token: the first cut holds enough tokens; 2: too few, so the cut grows; 32: as shipped.
    for chars_per_token in (8, 2, 32):
        cut, longest_cut, _ = run(chars_per_token)
        assert longest_cut < text_length / 4  # no long text was tokenized whole...
        assert cut == whole  # ...and every example and every count is as before


def test_cutting_keeps_the_same_tokens_without_a_chat_template(plain_tok, monkeypatch):
    long = long_text(6000, seed=1)
    rows = [{"text": long}, {"prompt": "Q:", "completion": long}, {"prompt": long, "completion": " A"}, {"text": "ok"}]
    pairs = [{"prompt": long, "chosen": "a", "rejected": long}, {"prompt": "Q:", "chosen": long, "rejected": "b"}]

    def run(chars_per_token):
        monkeypatch.setattr(data, "_CHARS_PER_TOKEN", chars_per_token)
        recording = Recording(plain_tok)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = (tokenize_sft(rows, recording, 40), tokenize_preference(pairs, recording, 40, 16),
                       tokenize_preference(pairs, recording, 40), tokenize_prompts([{"prompt": long}], recording, 16))
        return results, recording.longest

    whole, longest_whole = run(10 ** 9)
    cut, longest_cut = run(8)
    assert longest_whole >= len(long) > 4 * longest_cut
    assert cut == whole


def trained_tokenizer(kind: str):
    """A small tokenizer unlike SmolLM2's byte-level BPE, trained here in a fraction of a second:
    "bpe-across-spaces" has no pre-tokenizer, so its tokens span several words (the hardest case for
    cutting a text: a merge can reach across the cut); "unigram" is SentencePiece's model."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [long_text(12, seed=seed) for seed in range(400)]
    specials = ["<unk>", "<s>", "</s>"]
    if kind == "bpe-across-spaces":
        backend = Tokenizer(models.BPE())
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    else:
        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["bpe-across-spaces", "unigram"])
def test_cutting_keeps_the_same_tokens_with_other_tokenizer_models(monkeypatch, kind):
    tokenizer = trained_tokenizer(kind)
    if kind == "bpe-across-spaces":
        assert any("▁" in token.strip("▁") for token in tokenizer.get_vocab())  # tokens that span words
    long = long_text(6000, seed=3)
    rows = [{"text": long}, {"prompt": long, "completion": " A"}, {"prompt": "Q:", "completion": long}]

    def run(chars_per_token):
        monkeypatch.setattr(data, "_CHARS_PER_TOKEN", chars_per_token)
        recording = Recording(tokenizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = tokenize_sft(rows, recording, 48), tokenize_prompts([{"prompt": long}], recording, 48)
        return results, recording.longest

    whole, longest_whole = run(10 ** 9)
    assert longest_whole >= len(long)
    for chars_per_token in (8, 2):
        cut, longest_cut = run(chars_per_token)
        assert cut == whole and longest_cut < len(long) / 4


def test_a_3mb_line_is_cut_before_tokenizing_and_counted_as_truncated(tmp_path, tok):
    huge = " ".join([long_text(20_000, seed=2)] * 7)  # 3.5 MB on one line
    assert len(huge.encode()) > 3_000_000
    path = tmp_path / "train.jsonl"
    rows = [{"text": huge}, {"messages": [{"role": "user", "content": "Summarize."},
                                          {"role": "assistant", "content": huge}]}, {"text": "A normal row."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    started = time.perf_counter()
    with pytest.warns(UserWarning, match="2 of 3 samples were longer than max_seq_length=128"):
        examples, stats = load_sft_dataset(path, tok, 128)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"{elapsed:.1f} s"
    assert stats["num_truncated"] == 2 and stats["num_examples"] == 3
    head = tok(huge[:20_000], add_special_tokens=False)["input_ids"]
    assert examples[0].input_ids == head[:128]
    rendered = tok.apply_chat_template(rows[1]["messages"], tokenize=False)
    assert examples[1].input_ids == tok(rendered[:20_000], add_special_tokens=False)["input_ids"][:128]
    assert examples[2].input_ids == tok("A normal row.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
