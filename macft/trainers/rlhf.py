"""RLHF in one run: train a reward model on preference pairs, then the policy with PPO against it.
Backend-neutral; each backend's ``RLHFTrainer`` is ``RLHFLogic`` over its ``PPOTrainer``.

Stage 1 (``RewardTrainer``): the reward model is the policy's base (a shared-weights copy of the
reference, so no second copy of the weights) with its own LoRA adapter and a scalar head, trained
for ``reward_max_steps`` at ``reward_learning_rate`` on the pairs; it is saved, with its own
metrics and checkpoints, in ``output_dir/reward_model``.

Stage 2 (``PPOTrainer``): PPO on the prompts of the same data (their ``prompt`` column, with the
``system`` message where a row has one), scored by that reward model; the value model starts as
the reward model. The policy adapter is written to ``output_dir``.

A resumed run whose reward model is complete loads it instead of training it again; otherwise the
reward stage resumes from its own latest checkpoint.
"""

from pathlib import Path

from macft.config import RewardConfig, RLHFConfig
from macft.data import has_chat_template, load_prompt_dataset, load_rows
from macft.trainers.online import data_file
from macft.trainers.sft import data_options
from macft.trainers.value_head import HEAD_CONFIG

REWARD_MODEL_DIR = "reward_model"


class RLHFLogic:
    """Reward model, then PPO. ``train_dataset``: preference pairs ({"prompt","chosen","rejected"})."""

    def __init__(self, model, processing_class=None, args: RLHFConfig | None = None, train_dataset=None,
                 eval_dataset=None, ref_model=None, tokenizer=None, **trl_arguments):
        super().__init__(model, processing_class, args, train_dataset, eval_dataset, ref_model=ref_model,
                         tokenizer=tokenizer, **trl_arguments)
        self.reward_model = None  # trained in prepare()
        self.reward_metrics: list[dict] = []
        self._resuming = False

    # -- the backend's part
    reward_trainer_class = None  # the backend's RewardTrainer

    def new_reward_model(self):
        """A RewardModel: a fresh LoRA (the policy's settings) on a shared-weights copy of the
        reference base, and a fresh head initialised as HF initialises a classification head."""
        raise NotImplementedError

    def load_reward_weights(self, reward_model, directory):
        raise NotImplementedError

    # -- the run
    def _reward_model_comes_later(self) -> bool:
        return True

    def default_config(self):
        return RLHFConfig()

    @property
    def reward_model_dir(self) -> Path:
        return Path(self.args.output_dir) / REWARD_MODEL_DIR

    def train(self, resume_from_checkpoint=None):
        self._resuming = bool(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint)

    def prepare(self):
        self.ref_model = self.load_reference()  # loaded once, for both stages
        self.reward_model = self.train_reward_model()
        super().prepare()

    def train_reward_model(self):
        args: RLHFConfig = self.args
        reward_model = self.new_reward_model()
        directory = self.reward_model_dir
        if self._resuming and (directory / HEAD_CONFIG).exists():
            self.load_reward_weights(reward_model, directory)
            return reward_model
        config = RewardConfig(
            output_dir=str(directory), seed=args.seed, learning_rate=args.reward_learning_rate,
            max_steps=args.reward_max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps, weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm, lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps,
            warmup_ratio=args.warmup_ratio, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
            eval_batches=args.eval_batches, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
            disable_tqdm=args.disable_tqdm, max_length=self.policy.macft.max_seq_length or 1024,
            eval_strategy=args.eval_strategy, save_strategy=args.save_strategy,
            per_device_eval_batch_size=args.per_device_eval_batch_size, logging_first_step=args.logging_first_step,
            optim=args.optim, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon,
            adam_bias_correction=args.adam_bias_correction,
            lr_scheduler_kwargs=args.lr_scheduler_kwargs, dataset_columns=args.dataset_columns,
            strings_as_chat=args.strings_as_chat,
            nan_patience=args.nan_patience, compile_step=args.compile_step, pace_memory=args.pace_memory,
            center_rewards_coefficient=args.reward_center_rewards_coefficient,
            # This run decided already (it resumes, or it refused or replaced an earlier run in
            # output_dir): what a stopped reward stage left without a checkpoint starts over.
            overwrite_output_dir=True)
        trainer = self.reward_trainer_class(reward_model, self.tokenizer, config, train_dataset=self.train_dataset,
                                            eval_dataset=self.eval_dataset)
        resume = directory if self._resuming and trainer.run.latest_checkpoint() is not None else None
        trainer.train(resume_from_checkpoint=resume)
        self.reward_metrics = trainer.metrics_history
        return trainer.reward_model

    def _load_prompts(self):
        """The pairs' prompts (a row's system message folded in, as the reward model saw it) and
        their other columns, for PPO."""
        data = self.train_dataset
        self.data_files.extend(data_file(data))
        pairs = load_rows(data, "train", **data_options(self.args, self.tokenizer))
        rows = [prompt_row(row, has_chat_template(self.tokenizer)) for row in pairs]
        examples, _ = load_prompt_dataset(rows, self.tokenizer, "train", max_prompt_length=self.args.max_prompt_length)
        return examples


def prompt_row(row: dict, chat: bool) -> dict:
    """A preference row as a prompt row: its prompt (with the system message folded in) and columns."""
    prompt = {k: v for k, v in row.items() if k not in ("chosen", "rejected", "system")}
    system = row.get("system")
    if system is None or "prompt" not in row:
        return prompt
    if not chat and isinstance(row["prompt"], str):
        prompt["prompt"] = f"{system}\n\n{row['prompt']}"
    elif isinstance(row["prompt"], str):
        prompt["prompt"] = [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]}]
    elif not row["prompt"] or row["prompt"][0].get("role") != "system":
        prompt["prompt"] = [{"role": "system", "content": system}, *row["prompt"]]
    return prompt
