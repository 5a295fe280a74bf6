"""Online DPO (TRL's OnlineDPOTrainer) and XPO (trl 1.13's XPOTrainer): the backend-neutral trainers.

Online DPO: per prompt the current policy samples two completions (one batched, cache-sharing
pass), a judge (``macft.judges``: reward functions, a reward model, or an LLM) picks the chosen
one, and the DPO loss against the reference trains on the pair (``algorithms.online_dpo``). The
reference is the base with the adapters switched off, or a frozen copy (full fine-tuning, an
explicit path).

XPO: the same, except that per prompt y is sampled from the policy and y' from the reference;
the judge ranks y against y' (ties go to the policy's sample) and the loss is DPO on the ranked
pair plus α·Σ_t logπ_θ(y'_t) (``algorithms.xpo``). Rows are [policy samples; reference samples],
so judging, packing, reference log-probs and metrics are Online DPO's.

``OnlineDPOLogic`` / ``XPOLogic`` are mixed by each backend with its ``Trainer`` and its
``OnlineBackend`` calls (``macft.trainers.online``). Imports neither mlx nor torch.
"""

import math
import time
import warnings

import numpy as np

from algorithms.online_dpo import first_is_chosen, online_dpo_loss, penalized_rewards
from algorithms.xpo import xpo_loss
from macft.config import ConfigError, OnlineDPOConfig, XPOConfig
from macft.data import DataError, load_prompt_dataset
from macft.judges import Pairs, build_judge, finite_or_nan
from macft.rewards import RewardError
from macft.trainers.online import columns_of, data_file, eos_token_ids, pack, weighted_average
from macft.trainers.sft import data_options


class OnlineDPOLogic:
    """``OnlineDPOTrainer(model, ref_model=None, reward_funcs=None, judge=None, args=OnlineDPOConfig(...),
    train_dataset=rows, processing_class=tokenizer)``.

    The judge is ``judge`` (``"rewards"``, ``"llm:MODEL"``, a reward-model directory, or a judge
    object, TRL's pairwise judges included), else ``reward_model``, else ``reward_funcs``.
    """

    metric_curves = (("loss",), ("reward_mean",), ("rewards/chosen", "rewards/rejected", "rewards/margins"),
                     ("rewards/accuracies", "judge/tie_rate", "judge/first_win_rate"), ("objective/kl",),
                     ("completion_length",), ("grad_norm",))
    win_rate_key = "judge/first_win_rate"  # how often the first completion of a pair is chosen (ties count)

    def __init__(self, model, ref_model=None, reward_funcs=None, judge=None, args=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_model=None, tokenizer=None, **trl_arguments):
        super().__init__(model, processing_class, args, train_dataset, eval_dataset, tokenizer, **trl_arguments)
        model = self.model  # loaded here when it came as a path
        if ref_model is model:
            raise ValueError("model and ref_model must be different objects; leave ref_model=None to use "
                             "the base with the adapters off (LoRA) or a frozen copy (full fine-tuning)")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        self.ref_model = ref_model
        self.judge = build_judge(judge, reward_funcs=reward_funcs, reward_weights=self.args.reward_weights,
                                 reward_model=reward_model, policy_model=model)
        if self.args.missing_eos_penalty is not None and not self.judge.scored:
            warnings.warn("missing_eos_penalty applies to scored judges (reward functions, reward models); "
                          "a pairwise judge's verdict is used as it is", stacklevel=2)
        self._metric_parts: list = []

    def default_config(self):
        return OnlineDPOConfig()

    # -- data
    def prepare(self):
        args = self.args
        if args.loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"loss_type {args.loss_type!r}: expected sigmoid or ipo")
        if args.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
        room = (self.model.macft.max_seq_length or 2048) - args.max_new_tokens
        max_prompt = min(args.max_prompt_length or room, room)
        if max_prompt < 1:
            raise ConfigError(f"max_seq_length leaves no room for a prompt next to {args.max_new_tokens} new tokens")
        self.data_files.extend(data_file(self.train_dataset))
        self.examples, self.data_stats = load_prompt_dataset(self.train_dataset, self.tokenizer, "train", max_prompt,
                                                             **data_options(self.args, self.tokenizer))
        if not self.examples:
            raise DataError("the training data has no prompt")
        self.reference = (self.ref_model if self.ref_model is not None
                          else self.make_reference(args.reference_model_path))
        tokenizer = self.tokenizer
        self.eos_ids = eos_token_ids(tokenizer, self.model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.args.per_device_train_batch_size)

    def micro_batches(self, epoch: int, skip: int = 0):
        """One batch of prompts after another, each rolled out with the policy as it is then.

        Sampling is seeded by (seed, epoch, batch), so a resumed run samples what the uninterrupted
        one would have from the same weights."""
        size = self.args.per_device_train_batch_size
        order = np.random.default_rng([int(self.args.seed), int(epoch)]).permutation(len(self.examples))
        for index in range(skip, self.steps_per_epoch()):
            if not self.owns_micro_batch(index):  # another rank samples this batch
                yield None
                continue
            self.seed_sampling(int(np.random.SeedSequence([self.args.seed, epoch, index]).generate_state(1)[0]))
            yield self.make_batch([self.examples[i] for i in order[index * size:(index + 1) * size]])

    # -- rollout
    def sample_pairs(self, prompt_ids: list[list[int]]):
        """(first completions, second completions, first truncated, second truncated): two samples
        of the policy per prompt, decoded together."""
        rollout = self.sample(self.model, prompt_ids, num_samples=2, **self.sampling_settings())
        ids, truncated = rollout.completion_ids, rollout.truncated
        return ids[0::2], ids[1::2], truncated[0::2], truncated[1::2]

    def sampling_settings(self) -> dict:
        a = self.args
        return dict(max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                    eos_token_ids=self.eos_ids, pad_id=self.pad_id)

    def make_batch(self, examples):
        """Sample, judge, pack and score under the reference: everything outside the gradient.

        Rows are [first completions of the B prompts; second completions] (algorithms.online_dpo's
        layout), each prompt + completion, right-padded.
        """
        prompt_ids = [e.prompt_ids for e in examples]
        started = time.perf_counter()
        first, second, first_truncated, second_truncated = self.sample_pairs(prompt_ids)
        generation_time = time.perf_counter() - started
        decode = self.tokenizer.decode
        pairs = Pairs(prompts=[e.prompt if e.prompt is not None else e.prompt_text for e in examples],
                      prompt_ids=prompt_ids, first_ids=first, second_ids=second,
                      first_texts=[decode(c, skip_special_tokens=True) for c in first],
                      second_texts=[decode(c, skip_special_tokens=True) for c in second],
                      columns=columns_of(examples))
        try:
            verdict = self.judge(pairs)
        except RewardError as e:
            raise RewardError(f"step {self.state['step'] + 1}: {e}") from e

        contains_eos = self.to_array(np.array([not t for t in first_truncated + second_truncated]), "bool")
        rewards = None
        if verdict.scores is not None:
            rewards = self.to_array(np.asarray(verdict.scores, dtype=np.float32))
            chosen_first = first_is_chosen(rewards, missing_eos_penalty=self.args.missing_eos_penalty,
                                           contains_eos=contains_eos)
            penalized = penalized_rewards(rewards, missing_eos_penalty=self.args.missing_eos_penalty,
                                          contains_eos=contains_eos)
            tie = penalized[:len(examples)] == penalized[len(examples):]
        else:
            chosen_first = self.to_array(np.asarray(verdict.first_preferred, dtype=bool)
                                         | np.asarray(verdict.tie, bool), "bool")
            tie = self.to_array(np.asarray(verdict.tie, dtype=bool), "bool")

        ids, mask = pack(prompt_ids * 2, first + second, self.pad_id)
        input_ids, mask = self.to_array(ids, "int32"), self.to_array(mask)
        with self.no_gradient(), self.reference_policy(self.model, self.reference) as reference:
            ref_logps = self.frozen(self.sequence_logps(reference, input_ids))
        real_tokens = sum(len(p) for p in prompt_ids) * 2 + sum(len(c) for c in first + second)
        counts = self.to_array(np.array([len(examples), real_tokens], dtype=np.float32))

        self.record_rollout(verdict, self.to_numpy(chosen_first), self.to_numpy(tie), first, second,
                            first_truncated, second_truncated, generation_time, weight=len(examples))
        return input_ids, mask, ref_logps, chosen_first, rewards, contains_eos, counts

    def record_rollout(self, verdict, chosen_first, tie, first, second, first_truncated, second_truncated,
                       generation_time, weight):
        """This micro-batch's rollout metrics (GRPO's names where GRPO has them)."""
        lengths = np.array([len(c) for c in first + second], dtype=np.float64)
        metrics = {
            self.win_rate_key: float(np.mean(chosen_first)),
            "judge/tie_rate": float(np.mean(tie)),
            "completion_length": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "completion_truncated_frac": float(np.mean(first_truncated + second_truncated)),
            "rollout_tokens_per_sec": float(lengths.sum() / generation_time) if generation_time > 0 else 0.0,
        }
        if verdict.scores is not None:
            metrics["reward_mean"] = float(np.mean(verdict.scores))
            metrics["reward_std"] = float(np.std(verdict.scores))
        for name, values in verdict.per_function.items():
            metrics[f"rewards/{name}/mean"] = finite_or_nan(values)
        metrics.update(self.extra_rollout_metrics(verdict, first, second, first_truncated, second_truncated))
        self.add_step_metrics(metrics, weight)

    def extra_rollout_metrics(self, verdict, first, second, first_truncated, second_truncated) -> dict:
        return {"val/contain_eos_token": 1.0 - float(np.mean(first_truncated + second_truncated))}

    def add_step_metrics(self, metrics: dict, weight: float):
        """Averages what the micro-batches of one optimizer step measured (weighted by pairs);
        the base empties ``step_metrics`` after each step, which starts a new average."""
        if not self.step_metrics:
            self._metric_parts = []
        self._metric_parts.append((metrics, weight))
        self.step_metrics = weighted_average(self._metric_parts)

    # -- loss
    def batch_weight(self, batch) -> float:
        return batch[-1][0].item()  # pairs: the loss is a mean over pairs

    def batch_tokens(self, batch) -> int:
        return int(batch[-1][1].item())

    def loss(self, model, input_ids, mask, ref_logps, chosen_first, rewards, contains_eos, counts):
        a = self.args
        logps = self.sequence_logps(model, input_ids)
        loss, metrics = online_dpo_loss(logps, ref_logps, mask, rewards=rewards, chosen_first=chosen_first,
                                        beta=a.beta, loss_type=a.loss_type, missing_eos_penalty=a.missing_eos_penalty,
                                        contains_eos=contains_eos)
        metrics["beta"] = self.to_array(np.float32(a.beta))
        return loss, metrics


class XPOLogic(OnlineDPOLogic):
    metric_curves = (("loss", "loss/dpo", "loss/xpo"), ("objective/model_scores", "objective/ref_scores"),
                     ("rewards/chosen", "rewards/rejected", "rewards/margins"),
                     ("rewards/accuracies", "judge/tie_rate", "judge/policy_win_rate"), ("objective/kl",),
                     ("completion_length", "ref_completion_length"), ("grad_norm",))
    win_rate_key = "judge/policy_win_rate"  # how often the policy's sample beats the reference's

    def default_config(self):
        return XPOConfig()

    def sample_pairs(self, prompt_ids):
        """(policy samples, reference samples, their truncation flags): one of each per prompt."""
        settings = self.sampling_settings()
        policy = self.sample(self.model, prompt_ids, num_samples=1, **settings)
        with self.reference_policy(self.model, self.reference) as reference:
            ref = self.sample(reference, prompt_ids, num_samples=1, **settings)
        return policy.completion_ids, ref.completion_ids, policy.truncated, ref.truncated

    def extra_rollout_metrics(self, verdict, first, second, first_truncated, second_truncated) -> dict:
        metrics = {"val/model_contain_eos_token": 1.0 - float(np.mean(first_truncated)),
                   "val/ref_contain_eos_token": 1.0 - float(np.mean(second_truncated)),
                   "ref_completion_length": float(np.mean([len(c) for c in second]))}
        if verdict.scores is not None:  # trl 1.13's names
            half = len(first)
            metrics["objective/model_scores"] = float(np.mean(verdict.scores[:half]))
            metrics["objective/ref_scores"] = float(np.mean(verdict.scores[half:]))
        return metrics

    def loss(self, model, input_ids, mask, ref_logps, policy_chosen, rewards, contains_eos, counts):
        a = self.args
        logps = self.sequence_logps(model, input_ids)
        half = input_ids.shape[0] // 2
        loss, metrics = xpo_loss(logps[:half], ref_logps[:half], mask[:half], logps[half:], ref_logps[half:],
                                 mask[half:], policy_chosen, beta=a.beta, alpha=a.alpha, loss_type=a.loss_type)
        metrics["alpha"] = self.to_array(np.float32(a.alpha))
        metrics["beta"] = self.to_array(np.float32(a.beta))
        return loss, metrics
