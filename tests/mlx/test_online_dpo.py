"""Online DPO and XPO on MLX: each learns a toy task (a rewarded token) on a tiny random model, one
step's loss equals ``algorithms.online_dpo`` / ``algorithms.xpo`` computed by hand from separate
forward passes of the same pairs, the three judges (reward functions, a reward model, an LLM)
decide as they should, and both command lines run end to end."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from typer.testing import CliRunner

from algorithms.online_dpo import online_dpo_loss
from algorithms.xpo import xpo_loss
from macft import FastLanguageModel, OnlineDPOConfig, OnlineDPOTrainer, XPOConfig, XPOTrainer
from macft.cli import build_app
from macft.judges import Pairs, build_judge, judge_context, judge_question
from macft.mlx.judges import next_token_logprobs
from macft.mlx.sampling import sample_completions
from macft.mlx.trainer import sequence_logps

ROWS = [{"prompt": f"Say something about topic {i}.", "topic": i} for i in range(8)]
TARGET = 1000  # the rewarded token id


def count_target_reward(prompts, completions, completion_ids, **kwargs):
    """+1 per occurrence of the target token."""
    return [float(list(ids).count(TARGET)) for ids in completion_ids]


@pytest.fixture(scope="module")
def rewarded_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny qwen2 without a chat template (short prompts, fast steps) in which TARGET starts at
    about 20% probability per completion token: its LM-head row is set along the mean direction of
    the hidden states that predict completion tokens. On the random model it would be ~1/49152,
    and a count reward would never tell two completions apart."""
    from safetensors.numpy import load_file, save_file

    source = tiny_model_dir("qwen2")
    model, tokenizer = FastLanguageModel.from_pretrained(str(source))
    prompts = [tokenizer.encode(row["prompt"], add_special_tokens=False) for row in ROWS]
    mx.random.seed(0)
    rollout = sample_completions(model, prompts, num_samples=2, max_tokens=8, eos_token_ids=[tokenizer.eos_token_id])
    hidden = [np.array(model.model(mx.array([prompts[i] + c]))[0, len(prompts[i]) - 1:-1])
              for i, c in zip(rollout.prompt_index, rollout.completion_ids)]
    hidden = np.concatenate(hidden)
    direction = hidden.mean(axis=0) / np.linalg.norm(hidden.mean(axis=0))
    weights = np.array(model.lm_head.weight)
    low, high = 0.0, 4.0
    for _ in range(20):  # bisect the row's scale for a mean probability of 0.2
        scale = (low + high) / 2
        weights[TARGET] = scale * direction
        logits = hidden @ weights.T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        low, high = (scale, high) if probs[:, TARGET].mean() < 0.2 else (low, scale)

    out = tmp_path_factory.mktemp("rewarded-qwen2")
    tensors = load_file(source / "model.safetensors")
    tensors["lm_head.weight"] = weights.astype(tensors["lm_head.weight"].dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for path in source.iterdir():
        if path.name not in ("model.safetensors", "chat_template.jinja"):
            shutil.copy(path, out / path.name)
    return out


def load(path, train_type="lora"):
    model, tokenizer = FastLanguageModel.from_pretrained(str(path), full_finetuning=train_type == "full")
    if train_type != "full":
        FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    return model, tokenizer


def make_trainer(cls, model, tokenizer, tmp_path, steps, lr=1e-2, batch_size=4, reward_funcs=(count_target_reward,),
                 **config):
    config_class = XPOConfig if cls is XPOTrainer else OnlineDPOConfig
    args = config_class(logging_steps=1, seed=3407, output_dir=str(tmp_path / cls.__name__), max_steps=steps, learning_rate=lr,
                        per_device_train_batch_size=batch_size, lr_scheduler_type="constant", disable_tqdm=True,
                        **{"max_new_tokens": 8, "temperature": 1.0, **config})
    return cls(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=ROWS, processing_class=tokenizer)


def steps_of(metrics):
    return [m for m in metrics if "loss" in m]


def first_last(records, key, n=3):
    values = [r[key] for r in records]
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


# ----------------------------------------------------------------------------- learning


def test_online_dpo_raises_the_judge_reward(rewarded_model_dir, tmp_path):
    model, tokenizer = load(rewarded_model_dir)
    trainer = make_trainer(OnlineDPOTrainer, model, tokenizer, tmp_path, steps=12)
    trainer.train()
    records = steps_of(trainer.metrics_history)
    first, last = first_last(records, "reward_mean")
    assert last > first + 2.0, [r["reward_mean"] for r in records]  # of at most 8 target tokens per completion
    assert all(r["grad_norm"] > 0 for r in records[:3])
    for r in records:
        assert 0 <= r["judge/tie_rate"] <= 1 and 0 <= r["rewards/accuracies"] <= 1
        assert r["completion_length"] == 8 and r["completion_truncated_frac"] == 1.0
        assert "rewards/chosen" in r and "rewards/margins" in r and "objective/kl" in r
    assert (tmp_path / "OnlineDPOTrainer" / "plots.png").exists()
    assert (tmp_path / "OnlineDPOTrainer" / "adapters.safetensors").exists()


def test_xpo_policy_comes_to_beat_the_reference(rewarded_model_dir, tmp_path):
    model, tokenizer = load(rewarded_model_dir)
    trainer = make_trainer(XPOTrainer, model, tokenizer, tmp_path, steps=10)
    trainer.train()
    records = steps_of(trainer.metrics_history)
    first, last = first_last(records, "objective/model_scores")
    assert last > first + 2.0, [r["objective/model_scores"] for r in records]
    assert first_last(records, "judge/policy_win_rate")[1] > 0.8
    assert first_last(records, "rewards/margins")[1] > first_last(records, "rewards/margins")[0] + 0.5
    # the reference does not learn: its samples score what the untrained model's do (~0.2 * 8)
    assert np.mean([r["objective/ref_scores"] for r in records]) < 3.0
    assert all(r["loss/xpo"] < 0 and r["alpha"] == pytest.approx(1e-5) for r in records)


# ----------------------------------------------------------------------------- wiring


class Recorder:
    """A reward function that remembers what it was asked to score."""

    __name__ = "recorded_reward"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append((list(prompts), [list(ids) for ids in completion_ids], kwargs))
        return [float(sum(ids) % 7) for ids in completion_ids]


def completion_logps(model, prompts, completions) -> mx.array:
    """(N,) summed completion log-probs, each sequence run on its own (no padding)."""
    return mx.array([sequence_logps(model, mx.array([p + c]))[0, len(p) - 1:].sum().item()
                     for p, c in zip(prompts, completions)])


def test_online_dpo_step_equals_the_algorithm_on_the_same_pairs(rewarded_model_dir, tmp_path):
    model, tokenizer = load(rewarded_model_dir)
    # random LoRA B, so the policy differs from the reference before the first step
    lora_b = [(name, 0.05 * mx.random.normal(value.shape, key=mx.random.key(i)))
              for i, (name, value) in enumerate(tree_flatten(model.trainable_parameters())) if name.endswith("lora_b")]
    model.update(tree_unflatten(lora_b))
    before = tree_flatten(model.trainable_parameters())  # MLX arrays are immutable: this is a snapshot
    recorder = Recorder()
    trainer = make_trainer(OnlineDPOTrainer, model, tokenizer, tmp_path, steps=1, batch_size=3, lr=1e-3,
                           reward_funcs=[recorder], beta=0.5, missing_eos_penalty=1.5)
    trainer.train()
    logged = steps_of(trainer.metrics_history)[0]
    model.update(tree_unflatten(before))

    (prompts, completions, columns), = recorder.calls
    assert len(prompts) == 6 and prompts[:3] == prompts[3:]  # [first samples; second samples]
    assert columns["topic"][:3] == columns["topic"][3:]  # other columns reach reward functions
    ids_of = {e.prompt: e.prompt_ids for e in trainer.examples}
    prompt_ids = [ids_of[p] for p in prompts]
    reference, _ = FastLanguageModel.from_pretrained(str(rewarded_model_dir))
    policy_logps = completion_logps(model, prompt_ids, completions)
    ref_logps = completion_logps(reference, prompt_ids, completions)
    contains_eos = mx.array([tokenizer.eos_token_id in c for c in completions])
    expected, metrics = online_dpo_loss(policy_logps[:, None], ref_logps[:, None], mx.ones((6, 1)),
                                        rewards=mx.array([float(sum(c) % 7) for c in completions]), beta=0.5,
                                        missing_eos_penalty=1.5, contains_eos=contains_eos)
    assert abs(ref_logps - policy_logps).max().item() > 0.1  # the check is not trivially log(2)
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "objective/kl", "objective/scores"):
        assert logged[key] == pytest.approx(metrics[key].item(), rel=1e-4, abs=1e-4), key


def test_xpo_step_equals_the_algorithm_with_full_finetuning(rewarded_model_dir, tmp_path):
    model, tokenizer = load(rewarded_model_dir, "full")
    # perturb the policy so that it differs from the frozen reference the trainer loads from disk
    noisy = [(name, value + 0.05 * mx.random.normal(value.shape, key=mx.random.key(i)))
             for i, (name, value) in enumerate(tree_flatten(model.parameters())) if "mlp" in name]
    model.update(tree_unflatten(noisy))
    before = tree_flatten(model.parameters())
    recorder = Recorder()
    trainer = make_trainer(XPOTrainer, model, tokenizer, tmp_path, steps=1, batch_size=3, lr=1e-4,
                           reward_funcs=[recorder], beta=0.2, alpha=0.05, temperature=0.0)
    trainer.train()
    logged = steps_of(trainer.metrics_history)[0]
    model.update(tree_unflatten(before))

    (prompts, completions, _), = recorder.calls
    ids_of = {e.prompt: e.prompt_ids for e in trainer.examples}
    prompt_ids = [ids_of[p] for p in prompts]
    reference, _ = FastLanguageModel.from_pretrained(str(rewarded_model_dir))
    # greedy decoding: the first half is the policy's continuation, the second the reference's
    settings = dict(max_tokens=8, temperature=0.0, eos_token_ids=[tokenizer.eos_token_id])
    assert completions[:3] == sample_completions(model, prompt_ids[:3], **settings).completion_ids
    assert completions[3:] == sample_completions(reference, prompt_ids[3:], **settings).completion_ids
    assert completions[:3] != completions[3:]

    policy_logps = completion_logps(model, prompt_ids, completions)[:, None]
    ref_logps = completion_logps(reference, prompt_ids, completions)[:, None]
    scores = np.array([sum(c) % 7 for c in completions], dtype=float)
    ones = mx.ones((3, 1))
    expected, metrics = xpo_loss(policy_logps[:3], ref_logps[:3], ones, policy_logps[3:], ref_logps[3:], ones,
                                 mx.array(scores[:3] >= scores[3:]), beta=0.2, alpha=0.05)
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    for key in ("loss/dpo", "loss/xpo", "rewards/margins", "objective/kl"):
        assert logged[key] == pytest.approx(metrics[key].item(), rel=1e-4, abs=1e-4), key
    assert logged["judge/policy_win_rate"] == pytest.approx(np.mean(scores[:3] >= scores[3:]))


def test_resume_samples_what_the_uninterrupted_run_would(rewarded_model_dir, tmp_path):
    """Sampling is seeded by (seed, epoch, batch): a run resumed from step 2 draws the same
    completions at step 3 as the run that was never stopped, so its loss is the same."""
    def run(out, resume=None, **config):
        model, tokenizer = load(rewarded_model_dir)
        trainer = make_trainer(OnlineDPOTrainer, model, tokenizer, out, steps=3, batch_size=2, max_new_tokens=4,
                               **config)
        trainer.train(resume_from_checkpoint=resume)
        return steps_of(trainer.metrics_history)

    straight = run(tmp_path / "a")
    run(tmp_path / "b", save_steps=1)
    resumed = run(tmp_path / "b", resume=tmp_path / "b" / "OnlineDPOTrainer" / "checkpoints" / "step_2")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], abs=1e-6)
    # the implicit reward of the chosen completions depends on exactly which tokens were sampled
    assert abs(straight[2]["rewards/chosen"]) > 1e-3
    assert resumed[2]["rewards/chosen"] == pytest.approx(straight[2]["rewards/chosen"], abs=1e-6)


# ----------------------------------------------------------------------------- judges


def pairs_of(tokenizer, prompt, firsts, seconds):
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return Pairs(prompts=[prompt] * len(firsts), prompt_ids=[encode(prompt)] * len(firsts),
                 first_ids=[encode(t) for t in firsts], second_ids=[encode(t) for t in seconds],
                 first_texts=list(firsts), second_texts=list(seconds))


def test_rewards_judge_scores_first_then_second_completions(rewarded_model_dir):
    _, tokenizer = load(rewarded_model_dir)

    def banana_reward(prompts, completions, **kwargs):
        return [float(c.count("banana")) for c in completions]

    judge = build_judge(reward_funcs=[banana_reward])
    verdict = judge(pairs_of(tokenizer, "Name a fruit.", ["banana", "apple", "kiwi"], ["apple", "banana", "plum"]))
    assert verdict.scores.tolist() == [1, 0, 0, 0, 1, 0]
    assert list(verdict.per_function) == ["banana_reward"]


def test_llm_judge_picks_the_answer_a_tiny_model_was_trained_to_prefer(rewarded_model_dir, tmp_path):
    """A tiny model is taught (40 Adam steps), on the judge's own question, that an answer saying "banana" is the
    better one (in either position); the judge, loaded from disk with `llm:DIR`, then picks
    "banana" against words it never saw, in both orders, and calls identical answers a tie."""
    from macft.mlx.model import save_full_model

    model, tokenizer = FastLanguageModel.from_pretrained(str(rewarded_model_dir), full_finetuning=True)
    contexts, answers, targets = [], [], []
    for bad in ("rock", "cloud", "seven", "table", "green", "river"):
        for better in (0, 1):
            answer0, answer1 = ("banana", bad) if better == 0 else (bad, "banana")
            context, ids = judge_context(tokenizer, judge_question("Name a fruit.", answer0, answer1))
            contexts.append(context)
            answers.append(ids)
            targets.append(better)
    targets = mx.array(targets)[:, None]

    def loss(m):
        logps = next_token_logprobs(m, contexts, answers, pad_id=tokenizer.pad_token_id, batch_size=len(contexts))
        return -mx.take_along_axis(logps, targets, axis=-1).mean()

    optimizer, step = optim.Adam(learning_rate=3e-3), nn.value_and_grad(model, loss)
    for _ in range(40):
        value, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    assert value.item() < 0.1
    save_full_model(model, tmp_path / "judge")

    judge = build_judge(f"llm:{tmp_path / 'judge'}")
    held_out = ["paper", "lamp", "music"]
    verdict = judge(pairs_of(tokenizer, "Name a fruit.", ["banana"] * 3 + held_out + ["lamp"],
                             held_out + ["banana"] * 3 + ["lamp"]))
    assert verdict.first_preferred.tolist() == [True] * 3 + [False] * 4
    assert verdict.tie.tolist() == [False] * 6 + [True]
    margins = judge.preference(["Name a fruit."] * 3, ["banana"] * 3, held_out)
    assert (margins > 1.0).all(), margins


def test_reward_model_judge_scores_with_the_reward_model(rewarded_model_dir, tmp_path):
    from macft.mlx.reward_model import as_reward_model, load_reward_model
    from macft.mlx.value_head import save_scalar_model

    lm, tokenizer = load(rewarded_model_dir)
    save_scalar_model(as_reward_model(lm, seed=1), tmp_path / "rm")
    policy, _ = load(rewarded_model_dir)
    judge = build_judge(str(tmp_path / "rm"), policy_model=policy)
    pairs = pairs_of(tokenizer, "Name a fruit.", ["banana", "apple pie"], ["rock", "apple"])
    verdict = judge(pairs)
    expected = load_reward_model(tmp_path / "rm").score(pairs.prompt_ids * 2, pairs.first_ids + pairs.second_ids)
    np.testing.assert_allclose(verdict.scores, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(verdict.scores) > 0
    # the reward model is on the policy's base: its weights are shared, not loaded a second time
    assert judge.reward_model.lm.model.embed_tokens.weight is policy.model.embed_tokens.weight

    trainer = OnlineDPOTrainer(model=policy, judge=str(tmp_path / "rm"), train_dataset=ROWS, processing_class=tokenizer,
                               args=OnlineDPOConfig(logging_steps=1, output_dir=str(tmp_path / "run"), max_steps=1, max_new_tokens=4,
                                                    per_device_train_batch_size=2, disable_tqdm=True))
    trainer.train()
    record = steps_of(trainer.metrics_history)[0]
    assert np.isfinite(record["reward_mean"]) and np.isfinite(record["rewards/rm/mean"])


# ----------------------------------------------------------------------------- command line

REWARD_FILE = """
TARGET = 1000

def target_reward(prompts, completions, completion_ids, **kwargs):
    return [float(list(ids).count(TARGET)) for ids in completion_ids]
"""

FAILING_REWARD_FILE = """
calls = []

def flaky_reward(prompts, completions, **kwargs):
    calls.append(1)
    return [0.0] * (len(completions) if len(calls) == 1 else 3)
"""


def invoke(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.mark.parametrize("command, model, extra", [
    ("online_dpo", "chat", ()),  # a chat template: prompts become conversations
    ("xpo", "rewarded", ("--train-type", "full", "--alpha", "0.01", "--missing-eos-penalty", "1")),
])
def test_cli_runs_end_to_end(command, model, extra, tiny_model_dir, rewarded_model_dir, prompts_file, tmp_path):
    reward_file = tmp_path / "reward.py"
    reward_file.write_text(REWARD_FILE)
    base = tiny_model_dir("qwen2") if model == "chat" else rewarded_model_dir
    out = tmp_path / "run"
    result = invoke(command, "--model", base, "--data", prompts_file, "--reward-fn", reward_file, "--iters", 2,
                    "--batch-size", 2, "--max-completion-length", 6, "--beta", 0.2, "--learning-rate", 1e-3,
                    "--steps-per-report", 1, "--seed", 3407, "--adapter-path", out, *extra)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and "reward_mean" in r and "rewards/target_reward/mean" in r for r in records)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["max_new_tokens"] == 6 and run["config"]["beta"] == 0.2
    if command == "xpo":
        assert run["config"]["alpha"] == 0.01 and run["config"]["missing_eos_penalty"] == 1.0
        assert (out / "model.safetensors").exists() or list(out.glob("model*.safetensors"))
    else:
        assert (out / "adapters.safetensors").exists()
    assert (out / "plots.png").exists()
    assert "reward_mean" in result.output


def test_reward_function_of_wrong_length_stops_the_run_naming_it(rewarded_model_dir, prompts_file, tmp_path):
    reward_file = tmp_path / "flaky.py"
    reward_file.write_text(FAILING_REWARD_FILE)
    out = tmp_path / "run"
    result = invoke("online_dpo", "--model", rewarded_model_dir, "--data", prompts_file, "--reward-fn", reward_file,
                    "--iters", 3, "--batch-size", 2, "--max-completion-length", 4, "--save-every", 1,
                    "--adapter-path", out)
    assert result.exit_code == 2, result.output
    errors = [line[line.index("error: "):] for line in result.output.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0] == "error: step 2: reward function 'flaky_reward' returned 3 values for 4 completions"
    assert (out / "checkpoints" / "step_1" / "trainer_state.json").exists()  # the step before is kept


def test_no_judge_is_one_clear_line(rewarded_model_dir, prompts_file, tmp_path):
    result = invoke("xpo", "--model", rewarded_model_dir, "--data", prompts_file, "--adapter-path", tmp_path / "run")
    assert result.exit_code == 2 and "--reward-fn" in result.output and "--judge" in result.output
    result = invoke("online_dpo", "--model", rewarded_model_dir, "--data", prompts_file, "--judge", tmp_path / "nope",
                    "--adapter-path", tmp_path / "run")
    assert result.exit_code == 2 and "reward-model directory" in result.output, result.output
