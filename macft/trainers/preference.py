"""The offline preference trainers (DPO, CPO, ORPO, KTO) on every backend: their data, one padded
batch per step with every completion of it, the reference log-probs, and each algorithm's loss.

A micro-batch of B examples becomes one (R, T) batch of prompt + completion rows, grouped by kind:
for pairs, the B chosen rows then the B rejected rows (R = 2B), so both go through the model in one
forward pass. ``target_mask`` (R, T-1) is 1 where the predicted token is a completion token, aligned
with ``token_logps(model, input_ids)``. Reference log-probs (sums over the completion) are
computed outside the gradient: per batch, or once for the whole data set when
``precompute_ref_log_probs`` is set.

``PreferenceAlgorithm`` needs these backend calls (``PreferenceBackend``; ``macft.mlx.preference``
and ``cuda_bridge.preference`` provide them) besides the Trainer's ``to_array``, ``detach`` and
``token_logps``. Imports neither mlx nor torch.
"""

import itertools
import math
import os
from dataclasses import dataclass

import numpy as np

from algorithms import cpo, dpo, kto, masked, ops
from algorithms.orpo import orpo_loss
from algorithms.sft import sft_loss
from macft.config import ConfigError, CPOConfig, DPOConfig, KTOConfig, ORPOConfig, PreferenceConfig
from macft.data import load_preference_dataset, load_rows, tokenize_unpaired
from macft.trainers.sft import data_options, eval_source, pad_token_id, remember_data_file
from macft.training import TrainingLoop

PAIR_CURVES = (("loss", "eval_loss"), ("rewards/margins", "eval_rewards/margins"),
               ("rewards/accuracies", "eval_rewards/accuracies"), ("logps/chosen", "logps/rejected"))


def pad_rows(rows, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_ids, completion_ids) rows -> input_ids int32 (R, T), target_mask float32 (R, T-1).

    Right-padded to the longest row rounded up to a multiple of 8 (fewer shapes to compile).
    target_mask[r, t] is 1 when token t+1 of row r is a completion token.
    """
    longest = max(len(prompt) + len(completion) for prompt, completion in rows)
    width = max(8, -(-longest // 8) * 8)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    completion_mask = np.zeros((len(rows), width), dtype=np.float32)
    for r, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[r, :end] = list(prompt) + list(completion)
        completion_mask[r, len(prompt):end] = 1.0
    return input_ids, completion_mask[:, 1:]


def batch_indices(num_examples: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  lengths=None):
    """The example indices of each batch of one epoch; the order depends only on (seed, epoch).
    With ``lengths`` (per example), batches of similar lengths (``length_grouped_order``)."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    if lengths is not None:
        order = length_grouped_order(lengths, batch_size, rng)
    else:
        order = rng.permutation(num_examples) if shuffle else np.arange(num_examples)
    return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]


MEGA_BATCHES = 50  # batches per length-sorted group, as transformers' LengthGroupedSampler


def length_grouped_order(lengths, batch_size: int, rng) -> np.ndarray:
    """transformers' ``train_sampling_strategy="group_by_length"``: a random order cut into groups of
    up to 50 batches (fewer on small data: a quarter of the batches), each sorted longest first, so
    a batch pads to lengths close to its own; the group holding the longest example goes first, so
    a batch that does not fit in memory fails at the first step, not hours in."""
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    group = batch_size * max(1, min(len(lengths) // (batch_size * 4), MEGA_BATCHES))
    groups = [order[i:i + group] for i in range(0, len(order), group)]
    groups = [g[np.argsort(-lengths[g], kind="stable")] for g in groups]
    longest = int(np.argmax([lengths[g[0]] for g in groups]))
    groups.insert(0, groups.pop(longest))
    return np.concatenate(groups)


def check_loss_type(loss_type, known, algorithm: str):
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ConfigError(f"{algorithm} loss_type {loss_type!r}: expected one of {', '.join(known)}")


@dataclass
class PairLogps:
    """Per-token log-probs (B, T-1) and completion masks of the chosen and rejected halves of a
    2B-row batch (backend arrays)."""

    chosen: object
    chosen_mask: object
    rejected: object
    rejected_mask: object

    @classmethod
    def split(cls, token_logps, target_mask) -> "PairLogps":
        half = token_logps.shape[0] // 2
        return cls(token_logps[:half], target_mask[:half], token_logps[half:], target_mask[half:])

    def sums(self):
        return (masked.sequence_logps(self.chosen, self.chosen_mask),
                masked.sequence_logps(self.rejected, self.rejected_mask))

    def lengths(self):
        return ops.sum(self.chosen_mask, axis=-1), ops.sum(self.rejected_mask, axis=-1)


class PreferenceBackend:
    """The backend calls a preference trainer makes besides the Trainer's (a mixin's contract;
    the names are ``macft.trainers.online.OnlineBackend``'s)."""

    def make_reference(self, path=None):
        """π_ref: the model at ``path``, a frozen copy (full fine-tuning), the adapter weights the
        policy came with when they were trained (an ``AdapterSnapshot``, TRL's "ref" adapter), or
        None for the adapters-off base (a fresh LoRA/DoRA adapter)."""
        raise NotImplementedError

    def reference_policy(self, reference):
        """Context manager yielding the model that computes π_ref (the policy with its adapters
        switched off when ``reference`` is None)."""
        raise NotImplementedError

    def frozen_completion_logps(self, model, input_ids, target_mask):
        """(R,) completion log-prob sums of ``model``, outside the gradient and evaluated
        (``target_mask`` may hold token weights other than 0/1: LD-DPO's)."""
        raise NotImplementedError

    def frozen_log_sum_sq_probs(self, model, input_ids):
        """(R, T-1) log Σ_v p_v² of ``model``'s next-token distributions (WPO), outside the gradient."""
        raise NotImplementedError

    def concatenate(self, arrays):
        raise NotImplementedError

    def to_numpy(self, array) -> np.ndarray:
        raise NotImplementedError


class PreferenceAlgorithm(PreferenceBackend, TrainingLoop):
    """Offline trainer on preference pairs; DPO, CPO and ORPO differ only in ``pair_loss``.

    Micro-batches are ``(input_ids, target_mask, counts[, reference_logps][, *extras])`` where
    counts = [examples, real tokens] and reference_logps (R,) are the reference's completion sums
    of the same rows. Subclasses that lay rows out differently (KTO) override ``example_rows``,
    ``batch_rows``, ``batch_extras`` and ``loss``.
    """

    uses_reference = False
    metric_curves = PAIR_CURVES

    def __init__(self, model, processing_class=None, args=None, train_dataset=None, eval_dataset=None,
                 tokenizer=None, ref_model=None, **trl_arguments):
        """TRL's arguments; ``ref_model``: None (the default reference: the base with the adapters
        off, or a frozen copy for full fine-tuning) or a model path (``reference_model_path``)."""
        if ref_model is not None and not isinstance(ref_model, (str, os.PathLike)):
            raise TypeError(f"{type(self).__name__}: ref_model must be None (the base model with the adapters "
                            "switched off, or a frozen copy for full fine-tuning) or a model path; a loaded model "
                            "object is not supported here: pass its directory as ref_model= or reference_model_path=")
        if ref_model is not None:
            trl_arguments["reference_model_path"] = str(ref_model)
        super().__init__(model, processing_class, args, train_dataset, eval_dataset, tokenizer, **trl_arguments)

    def default_config(self):
        return PreferenceConfig()

    # -- data
    def load_examples(self, data, split: str, max_length: int):
        return load_preference_dataset(data, self.tokenizer, max_length, split=split,
                                       max_prompt_length=self.args.max_prompt_length,
                                       **data_options(self.args, self.tokenizer))

    def example_rows(self, example) -> list:
        """The rows of one example whose reference log-probs depend on that example alone."""
        return [(example.prompt_ids, example.chosen_ids), (example.prompt_ids, example.rejected_ids)]

    def batch_rows(self, examples) -> list:
        """Rows that depend on the whole batch (KTO's mismatched pairs); their reference log-probs
        are computed per batch even when the others are precomputed."""
        return []

    def has_batch_rows(self) -> bool:
        return False

    def batch_extras(self, examples, input_ids, target_mask) -> tuple:
        """Arrays appended to the micro-batch after the reference log-probs."""
        return ()

    def check_config(self):
        """Raise ConfigError for settings the algorithm rejects; runs first in prepare()."""

    def completion_logps(self, model, input_ids, target_mask):
        """(R,) summed log-probs of each row's completion tokens (differentiable)."""
        return masked.sequence_logps(self.token_logps(model, input_ids), target_mask)

    # -- TrainingLoop hooks
    def prepare(self):
        args: PreferenceConfig = self.args
        self.check_config()
        self.max_length = min(args.max_length, self.model.macft.max_seq_length or args.max_length)
        self.pad_id = pad_token_id(self.tokenizer)
        self.train_examples, self.train_stats = self._load(self.train_dataset, "train")
        source = eval_source(self.train_dataset, self.eval_dataset)
        self.eval_examples = self._load(source, "valid")[0] if source is not None else []
        self.reference, self.reference_cache, self.reference_released = None, {}, False
        if self.uses_reference:
            self.reference = self.make_reference(args.reference_model_path)
            if args.precompute_ref_log_probs:
                self._precompute_reference()

    def _load(self, data, split):
        remember_data_file(self.data_files, data, split)
        return self.load_examples(data, split, self.max_length)

    def _precompute_reference(self):
        """Reference log-probs of every example's own rows, once; with nothing left that needs the
        reference per batch, a frozen reference copy is released to free its memory."""
        for split, examples in (("train", self.train_examples), ("valid", self.eval_examples)):
            if not examples:
                continue
            columns = []
            for indices in batch_indices(len(examples), self.args.eval_batch_size, seed=0, epoch=0, shuffle=False):
                group = [examples[i] for i in indices]
                input_ids, target_mask = pad_rows(self._rows_by_kind(group), self.pad_id)
                logps = self._reference_logps(self.to_array(input_ids, "int32"), self.to_array(target_mask))
                columns.append(self.to_numpy(logps).reshape(-1, len(group)).T)  # (examples, kinds)
            self.reference_cache[split] = np.concatenate(columns)
        if not self.has_batch_rows():
            self.reference = None
            self.reference_released = True

    def _rows_by_kind(self, examples) -> list:
        per_example = [self.example_rows(e) for e in examples]
        return [rows[kind] for kind in range(len(per_example[0])) for rows in per_example]

    def _reference_logps(self, input_ids, target_mask):
        if self.reference_released:
            raise RuntimeError("reference log-probs were precomputed and the reference model released")
        with self.reference_policy(self.reference) as reference:
            return self.frozen_completion_logps(reference, input_ids, target_mask)

    def make_batch(self, examples, indices=None, split: str = "train") -> tuple:
        """The micro-batch of ``examples`` (``indices``: their positions in ``split``, to find
        precomputed reference log-probs)."""
        own_rows = self._rows_by_kind(examples)
        rows = own_rows + self.batch_rows(examples)
        input_ids, target_mask = pad_rows(rows, self.pad_id)
        input_ids, target_mask = self.to_array(input_ids, "int32"), self.to_array(target_mask)
        trained_tokens = sum(len(prompt) + len(completion) for prompt, completion in rows[:self.loss_rows(examples)])
        counts = self.to_array(np.array([float(len(examples)), float(trained_tokens)], dtype=np.float32))
        batch = (input_ids, target_mask, counts)
        if self.uses_reference:
            cache = self.reference_cache.get(split)
            if cache is not None and indices is not None:
                own = self.to_array(cache[np.asarray(indices)].T.reshape(-1))  # by kind, as the rows
                extra = len(rows) - len(own_rows)
                reference = own if not extra else self.concatenate(
                    [own, self._reference_logps(input_ids[len(own_rows):], target_mask[len(own_rows):])])
            else:
                reference = self._reference_logps(input_ids, target_mask)
            batch += (reference,)
        return batch + tuple(self.batch_extras(examples, input_ids, target_mask))

    def loss_rows(self, examples) -> int:
        """How many leading rows of the batch the policy trains on (their tokens are counted)."""
        return 2 * len(examples)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_examples) / self.args.per_device_train_batch_size)

    def micro_batches(self, epoch: int, skip: int = 0):
        strategy = self.args.train_sampling_strategy
        lengths = ([max(len(p) + len(c) for p, c in self.example_rows(e)) for e in self.train_examples]
                   if strategy == "group_by_length" else None)
        batches = batch_indices(len(self.train_examples), self.args.per_device_train_batch_size,
                                seed=self.args.seed, epoch=epoch, shuffle=strategy != "sequential", lengths=lengths)
        for index, indices in enumerate(itertools.islice(batches, skip, None), start=skip):
            if not self.owns_micro_batch(index):  # another rank's (its reference log-probs are made there)
                yield None
                continue
            yield self.make_batch([self.train_examples[i] for i in indices], indices, "train")

    def evaluate_batches(self):
        limit = self.args.eval_batches
        batches = batch_indices(len(self.eval_examples), self.args.eval_batch_size, seed=0, epoch=0, shuffle=False)
        for number, indices in enumerate(batches):
            if 0 <= limit <= number:
                break
            yield self.make_batch([self.eval_examples[i] for i in indices], indices, "valid")

    def batch_weight(self, batch) -> float:
        return batch[2][0].item()

    def batch_tokens(self, batch) -> int:
        return int(batch[2][1].item())

    def loss(self, model, input_ids, target_mask, counts, *reference):
        pairs = PairLogps.split(self.token_logps(model, input_ids), target_mask)
        return self.pair_loss(pairs, *reference)

    def pair_loss(self, pairs: PairLogps, reference=None):
        """(loss, metrics) of one batch of pairs; ``reference``: (2B,) chosen then rejected sums."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- the algorithms


class DPOAlgorithm(PreferenceAlgorithm):
    """Direct Preference Optimization (``algorithms.dpo``), TRL's DPOTrainer.

    The reference is the policy as the trainer receives it: the base model with the adapters switched
    off (a fresh LoRA/DoRA adapter), the policy with its starting adapter weights frozen (an adapter
    already trained, e.g. by SFT: TRL's "ref" adapter), a frozen copy of the base (full fine-tuning);
    or ``reference_model_path``. Its log-probs are computed before the gradient step, per batch or
    once (``precompute_ref_log_probs``).
    """

    uses_reference = True

    def default_config(self):
        return DPOConfig()

    def check_config(self):
        names = [self.args.loss_type] if isinstance(self.args.loss_type, str) else list(self.args.loss_type)
        if "aot_pair" in names:  # older TRL: sorted ρ_c against sorted ρ_r; TRL 1.16 refuses the name
            raise ConfigError("DPO loss_type 'aot_pair' is older TRL's name for what TRL 1.16 calls 'aot_unpaired'; "
                              "use 'aot_unpaired' (or 'aot', which sorts the policy's and the reference's margins)")
        check_loss_type(self.args.loss_type, dpo.LOSS_TYPES, "DPO")

    # LD-DPO (``ld_alpha``): the reference sums take the same token weights as the policy's.
    # WPO (``use_weighting``): the policy's log Σ_v p_v² comes from one more forward pass without
    # gradient when the micro-batch is made (the step's weights, before its update), appended to
    # the batch after the reference log-probs.
    def _reference_logps(self, input_ids, target_mask):
        return super()._reference_logps(input_ids, dpo.ld_token_weights(target_mask, self.args.ld_alpha))

    def batch_extras(self, examples, input_ids, target_mask) -> tuple:
        if not self.args.use_weighting:
            return ()
        return (self.frozen_log_sum_sq_probs(self.model, input_ids),)

    def loss(self, model, input_ids, target_mask, counts, reference, log_sum_sq_probs=None):
        return self.dpo_loss(self.token_logps(model, input_ids), target_mask, reference, log_sum_sq_probs)

    def pair_loss(self, pairs: PairLogps, reference=None, log_sum_sq_probs=None):
        token_logps = self.concatenate([pairs.chosen, pairs.rejected])
        return self.dpo_loss(token_logps, self.concatenate([pairs.chosen_mask, pairs.rejected_mask]), reference,
                             log_sum_sq_probs)

    def dpo_loss(self, token_logps, target_mask, reference, log_sum_sq_probs=None):
        """(loss, metrics) of the (2B, T-1) [chosen; rejected] token log-probs against the (2B,)
        reference sums (``algorithms.dpo.dpo_pair_loss``)."""
        args: DPOConfig = self.args
        loss, metrics = dpo.dpo_pair_loss(token_logps, target_mask, reference, beta=args.beta,
                                          loss_type=args.loss_type, loss_weights=args.loss_weights,
                                          label_smoothing=args.label_smoothing, discopop_tau=args.discopop_tau,
                                          ld_alpha=args.ld_alpha, use_weighting=args.use_weighting,
                                          log_sum_sq_probs=log_sum_sq_probs)
        if args.rpo_alpha:
            # RPO (arXiv:2404.19733): the chosen completions' token NLL, TRL's "sft" loss term.
            half = token_logps.shape[0] // 2
            nll, _ = sft_loss(token_logps[:half], target_mask[:half])
            loss = loss + args.rpo_alpha * nll
            metrics["nll_loss"] = self.detach(nll)
        return loss, metrics


class CPOAlgorithm(PreferenceAlgorithm):
    """Contrastive Preference Optimization (``algorithms.cpo``), incl. SimPO; TRL's CPOTrainer.
    Reference-free: one forward pass of the chosen and rejected rows per batch."""

    metric_curves = PreferenceAlgorithm.metric_curves + (("nll_loss",),)

    def default_config(self):
        return CPOConfig()

    def check_config(self):
        check_loss_type(self.args.loss_type, cpo.LOSS_TYPES, "CPO")

    def pair_loss(self, pairs: PairLogps, reference=None):
        args: CPOConfig = self.args
        return cpo.cpo_loss(pairs.chosen, pairs.chosen_mask, pairs.rejected, pairs.rejected_mask, beta=args.beta,
                        loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                        simpo_gamma=args.simpo_gamma, cpo_alpha=args.cpo_alpha)


class ORPOAlgorithm(PreferenceAlgorithm):
    """Odds Ratio Preference Optimization (``algorithms.orpo``); TRL's ORPOTrainer.
    Reference-free; the NLL term is over the chosen completion tokens (the paper's choice)."""

    metric_curves = PreferenceAlgorithm.metric_curves + (("nll_loss", "log_odds_ratio"),)

    def default_config(self):
        return ORPOConfig()

    def pair_loss(self, pairs: PairLogps, reference=None):
        return orpo_loss(pairs.chosen, pairs.chosen_mask, pairs.rejected, pairs.rejected_mask, beta=self.args.beta)


class KTOAlgorithm(PreferenceAlgorithm):
    """Kahneman-Tversky Optimization (``algorithms.kto``); TRL's KTOTrainer.

    Data: unpaired ``{"prompt","completion","label"}`` rows (label true = desirable), or preference
    pairs, which become one desirable and one undesirable row each (TRL unpairs them the same way).

    The KL reference point z_0 is estimated, as in TRL, from mismatched pairs made by rotating the
    completions of the batch by one: (x_1, y_B), (x_2, y_1), ..., (x_B, y_{B-1}). Their policy and
    reference log-probs are computed outside the gradient (the loss treats z_0 as a constant). The
    mismatched pairs change with the shuffled batch, so their reference log-probs are computed per
    batch even with ``precompute_ref_log_probs`` (which then covers the matched rows).
    """

    uses_reference = True
    metric_curves = (("loss", "eval_loss"), ("rewards/margins", "eval_rewards/margins"),
                     ("rewards/chosen", "rewards/rejected"), ("kl",), ("logps/chosen", "logps/rejected"))

    def default_config(self):
        return KTOConfig()

    @property
    def estimates_kl(self) -> bool:
        return self.args.loss_type == "kto"

    def check_config(self):
        check_loss_type(self.args.loss_type, kto.LOSS_TYPES, "KTO")
        if self.estimates_kl and self.args.per_device_train_batch_size < 2:
            raise ConfigError("KTO estimates its KL term from mismatched pairs within a batch: "
                              "per_device_train_batch_size must be >= 2")

    def load_examples(self, data, split: str, max_length: int):
        rows = load_rows(data, split, **data_options(self.args, self.tokenizer))
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
        labels = self.to_array(np.array([e.label for e in examples]), "bool")
        if not self.estimates_kl:
            return (labels,)
        count = len(examples)
        policy_kl = self.frozen_completion_logps(self.model, input_ids[count:], target_mask[count:])
        return labels, policy_kl

    def loss(self, model, input_ids, target_mask, counts, reference, labels, policy_kl=None):
        count = labels.shape[0]
        logps = self.completion_logps(model, input_ids[:count], target_mask[:count])
        args: KTOConfig = self.args
        return kto.kto_loss(logps, reference[:count], labels, policy_kl_logps=policy_kl,
                        ref_kl_logps=reference[count:] if policy_kl is not None else None, beta=args.beta,
                        desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
                        loss_type=args.loss_type)
