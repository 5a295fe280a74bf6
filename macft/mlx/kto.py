"""Kahneman-Tversky Optimization on MLX (``algorithms.kto``); TRL's KTOTrainer.

Data: unpaired ``{"prompt","completion","label"}`` rows (label true = desirable), or preference
pairs, which become one desirable and one undesirable row each (TRL unpairs them the same way).

The KL reference point z_0 is estimated, as in TRL, from mismatched pairs made by rotating the
completions of the batch by one: (x_1, y_B), (x_2, y_1), ..., (x_B, y_{B-1}). Their policy and
reference log-probs are computed outside the gradient (the loss treats z_0 as a constant). The
mismatched pairs change with the shuffled batch, so their reference log-probs are computed per
batch even with ``precompute_ref_log_probs`` (which then covers the matched rows).
"""

import mlx.core as mx

from algorithms.kto import LOSS_TYPES, kto_loss
from macft.config import ConfigError, KTOConfig
from macft.data import load_rows, tokenize_unpaired
from macft.mlx.preference import PreferenceTrainer, check_loss_type, completion_logps


class KTOTrainer(PreferenceTrainer):
    uses_reference = True
    metric_curves = (("loss", "eval_loss"), ("rewards/margins", "eval_rewards/margins"),
                     ("rewards/chosen", "rewards/rejected"), ("kl",), ("logps/chosen", "logps/rejected"))

    def default_config(self):
        return KTOConfig()

    @property
    def estimates_kl(self) -> bool:
        return self.args.loss_type == "kto"

    def check_config(self):
        check_loss_type(self.args.loss_type, LOSS_TYPES, "KTO")
        if self.estimates_kl and self.args.per_device_train_batch_size < 2:
            raise ConfigError("KTO estimates its KL term from mismatched pairs within a batch: "
                              "per_device_train_batch_size must be >= 2")

    def load_examples(self, data, split: str, max_length: int):
        rows = load_rows(data, split)
        return tokenize_unpaired(rows, self.tokenizer, max_length, self.args.max_prompt_length, source=rows.source)

    def example_rows(self, example) -> list:
        return [(example.prompt_ids, example.completion_ids)]

    def has_batch_rows(self) -> bool:
        return self.estimates_kl

    def batch_rows(self, examples) -> list:
        if not self.estimates_kl:
            return []
        rotated = examples[-1:] + examples[:-1]
        return [(e.prompt_ids, other.completion_ids[:self.max_length - len(e.prompt_ids)])
                for e, other in zip(examples, rotated)]

    def loss_rows(self, examples) -> int:
        return len(examples)

    def batch_extras(self, examples, input_ids, target_mask) -> tuple:
        labels = mx.array([e.label for e in examples])
        if not self.estimates_kl:
            return (labels,)
        count = len(examples)
        policy_kl = mx.stop_gradient(completion_logps(self.model, input_ids[count:], target_mask[count:]))
        mx.eval(policy_kl)
        return labels, policy_kl

    def loss(self, model, input_ids, target_mask, counts, reference, labels, policy_kl=None):
        count = labels.shape[0]
        logps = completion_logps(model, input_ids[:count], target_mask[:count])
        args: KTOConfig = self.args
        return kto_loss(logps, reference[:count], labels, policy_kl_logps=policy_kl,
                        ref_kl_logps=reference[count:] if policy_kl is not None else None, beta=args.beta,
                        desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
                        loss_type=args.loss_type)
