"""Batched sampling on the bridge: left-padded prompts prefilled once, the KV cache shared by each
prompt's samples, every row decoding together; checked against transformers' own generate, one
prompt at a time."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from cuda_bridge.generate import generate_text
from cuda_bridge.model import load_pretrained
from cuda_bridge.sampling import apply_top_p, sample_completions

PROMPTS = ["Hello there", "The code word is banana 2. Certainly! What is", "a"]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("MACFT_KERNELS", "reference")


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    model, tokenizer = load_pretrained(str(path))
    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer, oracle


def hf_greedy(oracle, prompt, max_new_tokens, eos_token_id=None, pad_token_id=0):
    out = oracle.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id)
    return out[0, len(prompt):].tolist()


def test_batched_greedy_equals_transformers_one_prompt_at_a_time(models):
    model, tokenizer, oracle = models
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    rollout = sample_completions(model, prompts, max_tokens=10, temperature=0.0, pad_id=tokenizer.pad_token_id)
    assert rollout.prompt_index == [0, 1, 2] and rollout.truncated == [True, True, True]
    for prompt, completion in zip(prompts, rollout.completion_ids):
        assert completion == hf_greedy(oracle, prompt, 10)


def test_eos_stops_a_row_and_num_samples_share_the_prefill(models):
    model, tokenizer, oracle = models
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    free = sample_completions(model, prompts, max_tokens=8, temperature=0.0)
    eos = free.completion_ids[1][3]  # prompt 1's fourth greedy token stands in for EOS
    rollout = sample_completions(model, prompts, num_samples=2, max_tokens=8, temperature=0.0, eos_token_ids=[eos])
    assert rollout.prompt_index == [0, 0, 1, 1, 2, 2]
    for row, (i, completion) in enumerate(zip(rollout.prompt_index, rollout.completion_ids)):
        expected = hf_greedy(oracle, prompts[i], 8, eos_token_id=eos)
        assert completion == expected, row
        assert rollout.truncated[row] == (eos not in completion)
    assert rollout.completion_ids[2] == free.completion_ids[1][:4] and not rollout.truncated[2]


def test_sampling_is_seeded_and_filters(models):
    model, tokenizer, _ = models
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    torch.manual_seed(0)
    first = sample_completions(model, prompts, num_samples=3, max_tokens=6, temperature=1.0)
    torch.manual_seed(0)
    second = sample_completions(model, prompts, num_samples=3, max_tokens=6, temperature=1.0)
    assert first == second
    assert len({tuple(c) for c in first.completion_ids}) > 2  # samples of a prompt differ
    greedy = sample_completions(model, prompts, max_tokens=6, temperature=0.0)
    top1 = sample_completions(model, prompts, max_tokens=6, temperature=1.0, top_k=1)
    assert top1.completion_ids == greedy.completion_ids
    # top-p keeps the smallest set of most likely tokens holding top_p of the mass
    logprobs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = apply_top_p(logprobs, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_generate_text_uses_the_chat_template(models):
    model, tokenizer, oracle = models
    text = generate_text(model, tokenizer, "What is 2+3?", max_tokens=8)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    expected = hf_greedy(oracle, list(ids), 8, eos_token_id=tokenizer.eos_token_id)
    if expected and expected[-1] == tokenizer.eos_token_id:
        expected = expected[:-1]
    assert text == tokenizer.decode(expected) and text
