"""RLHF on MLX: the reward model ranks held-out pairs and reloads exactly; PPO raises a toy reward
while its value model learns the returns; the rollout wiring (KL-shaped rewards, EOS penalty, GAE,
whitening); full fine-tuning; and the reward / ppo / rlhf commands end to end."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from algorithms.masked import masked_mean
from algorithms.ppo import masked_whiten
from macft import FastLanguageModel, PPOConfig, PPOTrainer, RewardConfig, RewardTrainer
from macft.cli import build_app
from macft.data import tokenize_preference
from macft.mlx.reference import adapters_disabled
from macft.mlx.reward_model import load_reward_model

WORDS = ("red blue green small large quick slow happy sad tall short bright dark warm cold soft loud quiet old "
         "new").split()


def marker_pairs(count, seed):
    """Chosen answers contain the word 'banana' somewhere, rejected ones never do; otherwise both are
    random words, so a fresh reward model ranks them at chance."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        chosen, rejected = rng.sample(WORDS, rng.randint(3, 5)), rng.sample(WORDS, rng.randint(3, 5))
        chosen.insert(rng.randint(0, len(chosen)), "banana")
        rows.append({"prompt": f"Describe thing {i}.", "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return rows


def lora_model(base, **kwargs):
    model, tokenizer = FastLanguageModel.from_pretrained(str(base), **kwargs)
    if not kwargs.get("full_finetuning"):
        FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    return model, tokenizer


def pair_scores(reward_model, tokenizer, rows):
    examples, _ = tokenize_preference(rows, tokenizer, 128)
    prompts = [e.prompt_ids for e in examples]
    return reward_model.score(prompts, [e.chosen_ids for e in examples]), \
        reward_model.score(prompts, [e.rejected_ids for e in examples])


def only_lora_leaves(adapter_dir):
    return all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in mx.load(str(adapter_dir / "adapters.safetensors")))


def test_reward_model_ranks_held_out_pairs_and_reloads(tiny_model_dir, tmp_path):
    from mlx_lm import load as mlx_lm_load

    base = tiny_model_dir("llama")
    model, tokenizer = lora_model(base)
    out = tmp_path / "rm"
    args = RewardConfig(logging_steps=1, output_dir=str(out), max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3,
                        lr_scheduler_type="constant", disable_tqdm=True, max_length=128)
    held_out = marker_pairs(24, seed=1)
    trainer = RewardTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=marker_pairs(48, seed=0),
                            eval_dataset=held_out)
    chosen, rejected = pair_scores(trainer.reward_model, tokenizer, held_out)
    before = (chosen > rejected).mean()
    trainer.train()
    metrics = trainer.metrics_history
    chosen, rejected = pair_scores(trainer.reward_model, tokenizer, held_out)
    after = (chosen > rejected).mean()
    assert 0.25 <= before <= 0.75, before
    assert after >= 0.8, after
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    assert [m["eval_accuracy"] for m in metrics if "eval_accuracy" in m][-1] == pytest.approx(after)

    # adapter (LoRA leaves only, so mlx_lm takes it) + head + a json saying what it is
    assert only_lora_leaves(out)
    assert json.loads((out / "value_head.json").read_text())["kind"] == "reward_model"
    mlx_lm_load(str(base), adapter_path=str(out))
    reloaded = load_reward_model(out)
    again_chosen, again_rejected = pair_scores(reloaded, tokenizer, held_out)
    np.testing.assert_allclose(again_chosen, chosen, atol=1e-5)
    np.testing.assert_allclose(again_rejected, rejected, atol=1e-5)

    # PPO against it: the reward adapter goes on the policy's own base weights (no second copy), and
    # the value model starts out as the reward model.
    policy, _ = lora_model(base)
    ppo = PPOTrainer(model=policy, processing_class=tokenizer, train_dataset=PROMPTS[:2], reward_model=str(out),
                     args=ppo_config(tmp_path, per_device_train_batch_size=2, num_mini_batches=1))
    ppo.prepare()
    shared = ppo.reward_model.lm.model.layers[0].mlp.down_proj.linear.weight
    assert shared is policy.model.layers[0].mlp.down_proj.linear.weight
    (first, *_), _ = tokenize_preference(held_out, tokenizer, 128)
    assert ppo.reward_model.score([first.prompt_ids], [first.chosen_ids])[0] == pytest.approx(chosen[0], abs=1e-5)
    values = ppo.value_model(mx.array([first.prompt_ids + first.chosen_ids]))
    assert values[0, -1].item() == pytest.approx(float(chosen[0]), abs=1e-5)


def favoured_tokens(model):
    """A fixed half of the vocabulary: the tokens whose LM-head row points along one random direction.
    A tiny random model can learn to favour them by turning its last hidden state that way (a
    single rewarded token would almost never be sampled from its near-uniform distribution)."""
    direction = np.random.default_rng(0).normal(size=model.lm_head.weight.shape[1])
    return np.nonzero(np.array(model.lm_head.weight) @ direction > 0)[0]


def favoured_token_reward(model, tokenizer):
    """+1 per favoured token in the completion."""
    favoured = set(favoured_tokens(model).tolist())

    def favoured_tokens_reward(prompts, completions, **columns):
        return [float(sum(t in favoured for t in tokenizer.encode(c, add_special_tokens=False))) for c in completions]

    return favoured_tokens_reward


def favoured_probability(model, prompts, favoured, temperature):
    """The policy's exact probability of a favoured first completion token, averaged over prompts."""
    model.eval()
    logits = mx.concatenate([model(mx.array([p.prompt_ids]))[:, -1] for p in prompts]) / temperature
    return float(np.array(mx.softmax(logits.astype(mx.float32), axis=-1))[:, favoured].sum(axis=1).mean())


def mean_rollout_reward(trainer, seed=(7, 7)) -> float:
    """The mean reward of one fresh rollout over 64 prompts (its metrics kept out of the next step's)."""
    trainer.make_rollout(trainer.prompts[:64], seed=seed)
    reward = trainer.step_metrics["reward_mean"]
    trainer.step_metrics = {}
    return reward


def ppo_config(tmp_path, **overrides):
    # A low temperature sharpens the tiny model's near-uniform next-token distribution, so that
    # turning its hidden state moves probability mass fast enough to learn in a few rollouts.
    values = dict(logging_steps=1, output_dir=str(tmp_path / "ppo"), max_steps=24, per_device_train_batch_size=16, num_mini_batches=1,
                  num_ppo_epochs=4, learning_rate=5e-3, lr_scheduler_type="constant", disable_tqdm=True,
                  response_length=3, temperature=0.25, kl_coef=0.02)
    values.update(overrides)
    return PPOConfig(**values)


PROMPTS = [{"prompt": f"Say something {i}."} for i in range(64)]


def test_ppo_raises_a_toy_reward_and_its_value_model_learns_the_returns(tiny_model_dir, tmp_path):
    from mlx_lm import load as mlx_lm_load

    base = tiny_model_dir("llama")
    model, tokenizer = lora_model(base)
    reward = favoured_token_reward(model, tokenizer)
    # 8 rollouts of 32 prompts: enough that every seed tried (3407, 2, 5, 6) learns with a wide margin;
    # 6 rollouts of 16 learnt too little on some seeds.
    config = ppo_config(tmp_path, max_steps=32, per_device_train_batch_size=32)
    trainer = PPOTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=PROMPTS,
                         reward_funcs=[reward])
    trainer.prepare()
    favoured = favoured_tokens(model)
    before = favoured_probability(model, trainer.prompts[:16], favoured, config.temperature)
    reward_before = mean_rollout_reward(trainer)
    trainer.train()
    metrics = trainer.metrics_history
    after = favoured_probability(model, trainer.prompts[:16], favoured, config.temperature)
    reward_after = mean_rollout_reward(trainer)
    # The exact probability of a favoured first token, not a sample: measured 0.54 -> 0.93..0.99.
    assert 0.4 < before < 0.6 and after > 0.8, (before, after)
    # The reward is a count over 3 sampled tokens: one 16-row rollout is too noisy to compare steps
    # (its standard error is ~0.2), so compare 64-row rollouts before and after training (standard
    # error ~0.1; measured 1.6..2.0 -> 2.8..3.0).
    assert reward_after >= reward_before + 0.6, (reward_before, reward_after)
    scores = [m["reward_mean"] for m in metrics if "reward_mean" in m]
    value_losses = [m["value_loss"] for m in metrics if "value_loss" in m]
    assert len(scores) == 8  # 32 steps / 4 epochs of one minibatch per rollout
    assert np.mean(value_losses[-4:]) < 0.5 * np.mean(value_losses[:4]), value_losses
    assert max(m["clip_fraction"] for m in metrics if "clip_fraction" in m) > 0  # clipping acts
    kls = [m["kl"] for m in metrics if "kl" in m]
    assert kls[0] == pytest.approx(0, abs=1e-6) and kls[-1] > 0  # the policy starts as the reference, then moves

    # On a fresh rollout the trained value model predicts the returns far better than its start (a zero head).
    rollout = trainer.make_rollout(trainer.prompts[:16], seed=(9, 9))
    error = masked_mean((rollout.old_values - rollout.returns) ** 2, rollout.mask).item()
    assert error < 0.5 * masked_mean(rollout.returns ** 2, rollout.mask).item()

    # The policy adapter loads in mlx_lm and gives the trained policy's logits; the value model sits beside it.
    out = tmp_path / "ppo"
    assert only_lora_leaves(out) and only_lora_leaves(out / "value_model")
    assert (out / "value_model" / "value_head.safetensors").exists()
    loaded, _ = mlx_lm_load(str(base), adapter_path=str(out))
    ids = mx.array([trainer.prompts[0].prompt_ids])
    model.eval()
    assert mx.abs(loaded(ids).astype(mx.float32) - model(ids)).max().item() < 1e-4


def test_rollout_wiring_kl_rewards_eos_penalty_gae_whitening(tiny_model_dir, tmp_path):
    model, tokenizer = lora_model(tiny_model_dir("llama"))
    config = ppo_config(tmp_path, per_device_train_batch_size=4, num_mini_batches=1, response_length=5,
                        temperature=0.9, kl_coef=0.1, gamma=1.0, lam=1.0, missing_eos_penalty=2.0)
    trainer = PPOTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=PROMPTS[:8],
                         reward_funcs=[lambda prompts, completions, **columns: [1.0] * len(completions)])
    trainer.prepare()
    # Move the policy off the reference and give the value head weights, so KL and values are not zero.
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape, key=mx.random.key(1))
    trainer.value_model.head.weight = 0.1 * mx.random.normal(trainer.value_model.head.weight.shape,
                                                             key=mx.random.key(2))
    rollout = trainer.make_rollout(trainer.prompts[:4])
    metrics = trainer.step_metrics
    mask = np.array(rollout.mask, dtype=np.float32)
    truncated = np.array([not (row[:n] == tokenizer.eos_token_id).any()
                          for row, n in zip(np.array(rollout.completion_ids), rollout.completion_lengths)])
    scores = 1.0 - 2.0 * truncated
    assert metrics["reward_mean"] == pytest.approx(scores.mean())

    # Reference log-probs, recomputed here with the adapters off: r_t = -0.1 (logp - ref) + score on the last token.
    from macft.mlx.ppo import completion_logps

    with adapters_disabled(model):
        ref, _ = completion_logps(model, mx.array(rollout.input_ids), mx.array(rollout.starts),
                                  rollout.completion_ids, 0.9)
    old = np.array(rollout.old_logps)
    rewards = -0.1 * (old - np.array(ref)) * mask
    last = rollout.completion_lengths - 1
    rewards[np.arange(4), last] += scores
    assert np.abs(rewards).max() > 0 and np.abs(old - np.array(ref)).max() > 1e-3
    assert metrics["kl"] == pytest.approx(((old - np.array(ref)) * mask).sum(1).mean(), abs=1e-4)

    # gamma = lam = 1: returns are the rewards summed to the end; advantages = whiten(returns - values).
    expected_returns = np.flip(np.cumsum(np.flip(rewards, 1), 1), 1)
    np.testing.assert_allclose(np.array(rollout.returns) * mask, expected_returns * mask, atol=1e-4)
    values = np.array(rollout.old_values)
    assert np.abs(values * mask).max() > 1e-3
    expected_advantages = masked_whiten(mx.array(expected_returns - values), rollout.mask)
    np.testing.assert_allclose(np.array(rollout.advantages), np.array(expected_advantages) * mask, atol=1e-4)
    advantages = np.array(rollout.advantages)[mask > 0]
    assert abs(advantages.mean()) < 1e-5 and advantages.std(ddof=1) == pytest.approx(1.0, abs=1e-3)


def test_ppo_with_full_fine_tuning_shares_the_frozen_reference(tiny_model_dir, tmp_path):
    from mlx_lm import load as mlx_lm_load

    model, tokenizer = lora_model(tiny_model_dir("llama"), full_finetuning=True)
    config = ppo_config(tmp_path, max_steps=2, per_device_train_batch_size=2, num_mini_batches=1, num_ppo_epochs=2,
                        learning_rate=1e-4)
    trainer = PPOTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=PROMPTS[:4],
                         reward_funcs=[favoured_token_reward(model, tokenizer)])
    weight_before = np.array(model.model.layers[0].mlp.down_proj.weight)
    trainer.train()
    metrics = trainer.metrics_history
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    # The reference is a frozen copy; the value model's base is that copy's very arrays, under its own LoRA.
    value_layer = trainer.value_model.lm.model.layers[0].mlp.down_proj
    assert value_layer.linear.weight is trainer.reference.model.layers[0].mlp.down_proj.weight
    assert np.abs(np.array(trainer.reference.model.layers[0].mlp.down_proj.weight) - weight_before).max() == 0
    assert np.abs(np.array(model.model.layers[0].mlp.down_proj.weight) - weight_before).max() > 0
    mlx_lm_load(str(tmp_path / "ppo"))  # a full model directory


# ----------------------------------------------------------------------------- command line

app = build_app()


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in marker_pairs(8, seed=0)))
    return path


SMALL_PPO = ("--batch-size", 2, "--num-ppo-epochs", 1, "--response-length", 4, "--learning-rate", 1e-3,
             "--steps-per-report", 1)


def test_reward_cli_then_ppo_cli_against_it(tiny_model_dir, pairs_file, tmp_path):
    base = tiny_model_dir("llama")
    reward_dir, ppo_dir = tmp_path / "rm", tmp_path / "ppo"
    result = invoke("reward", "--model", base, "--data", pairs_file, "--iters", 2, "--batch-size", 4,
                    "--steps-per-report", 1, "--adapter-path", reward_dir)
    assert result.exit_code == 0, result.output
    assert "accuracy" in read_metrics(reward_dir)[0] and (reward_dir / "value_head.safetensors").exists()
    assert only_lora_leaves(reward_dir)

    result = invoke("ppo", "--model", base, "--data", pairs_file, "--reward-model", reward_dir, "--iters", 2,
                    *SMALL_PPO, "--kl-coef", 0.1, "--vf-coef", 0.5, "--adapter-path", ppo_dir)
    assert result.exit_code == 0, result.output
    metrics = read_metrics(ppo_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    assert {"reward_mean", "kl", "completion_length", "value_loss", "clip_fraction", "entropy"} <= set(metrics[0])
    assert only_lora_leaves(ppo_dir) and (ppo_dir / "value_model" / "value_head.json").exists()
    assert json.loads((ppo_dir / "run.json").read_text())["config"]["vf_coef"] == 0.5
    assert "reward_mean" in result.output


def test_ppo_cli_with_a_reward_function_resumes(tiny_model_dir, pairs_file, tmp_path):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def length_reward(prompts, completions, chosen=None, **kwargs):\n"
                           "    assert chosen is not None  # dataset columns arrive as keyword arguments\n"
                           "    return [float(len(c)) / 10 for c in completions]\n")
    out = tmp_path / "ppo"
    common = ("--model", tiny_model_dir("llama"), "--data", pairs_file, "--reward-fn", reward_file, *SMALL_PPO,
              "--num-mini-batches", 2, "--adapter-path", out, "--save-every", 1)
    assert invoke("ppo", *common, "--iters", 1).exit_code == 0
    checkpoint = out / "checkpoints" / "step_1" / "adapter"
    assert (checkpoint / "value_model" / "value_head.safetensors").exists() and only_lora_leaves(checkpoint)
    # Resuming inside a rollout (2 steps each) samples it again and trains its second minibatch.
    result = invoke("ppo", *common, "--iters", 3, "--resume", out)
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "reward/length_reward_mean" in metrics[0]


def test_rlhf_cli_trains_the_reward_model_then_ppo(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "rlhf"
    result = invoke("rlhf", "--model", tiny_model_dir("llama"), "--data", pairs_file, "--reward-max-steps", 2,
                    "--reward-learning-rate", 1e-3, "--iters", 2, *SMALL_PPO, "--adapter-path", out)
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in read_metrics(out / "reward_model") if "loss" in m] == [1, 2]
    assert json.loads((out / "reward_model" / "value_head.json").read_text())["kind"] == "reward_model"
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and "reward_mean" in metrics[0]
    assert only_lora_leaves(out) and (out / "value_model" / "value_head.safetensors").exists()
    assert (out / "plots.png").exists()
