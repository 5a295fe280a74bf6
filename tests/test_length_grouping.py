"""Length-grouped batches for the preference trainers (transformers' train_sampling_strategy=
"group_by_length"): every example once per epoch, the longest first, far less padding than a
random order, the same order for the same (seed, epoch); the config's names and its errors; and a
DPO run on MLX whose batches pad less."""

import numpy as np
import pytest

from macft.config import ConfigError, DPOConfig, KTOConfig, SFTConfig
from macft.trainers.preference import batch_indices


def padded_tokens(batches, lengths) -> int:
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


def test_grouped_batches_hold_similar_lengths_and_every_example_once():
    lengths = np.random.default_rng(0).integers(5, 1000, size=1000)
    grouped = batch_indices(len(lengths), 8, seed=1, epoch=0, lengths=lengths)
    shuffled = batch_indices(len(lengths), 8, seed=1, epoch=0)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(1000))
    assert lengths[grouped[0]].max() == lengths.max()  # a batch too big for memory fails at step 1
    assert padded_tokens(grouped, lengths) < 0.1 * padded_tokens(shuffled, lengths)
    again = batch_indices(len(lengths), 8, seed=1, epoch=0, lengths=lengths)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again))
    next_epoch = batch_indices(len(lengths), 8, seed=1, epoch=1, lengths=lengths)
    assert not all(np.array_equal(a, b) for a, b in zip(grouped, next_epoch))


def test_small_data_still_groups():
    lengths = np.array([3, 50, 4, 60, 5, 70, 6, 80])
    grouped = batch_indices(len(lengths), 2, seed=0, epoch=0, lengths=lengths)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(8))
    assert lengths[grouped[0]].max() == 80


def test_config_names():
    assert DPOConfig(train_sampling_strategy="group_by_length").train_sampling_strategy == "group_by_length"
    assert KTOConfig(group_by_length=True).train_sampling_strategy == "group_by_length"  # transformers 4's name
    with pytest.raises(ConfigError, match=r"train_sampling_strategy='by_size': expected one of random, sequential, "
                                          r"group_by_length"):
        DPOConfig(train_sampling_strategy="by_size")
    with pytest.warns(UserWarning, match=r"group_by_length=True ignored"):
        SFTConfig(group_by_length=True)  # SFT has packing and mlx-lm's sort by length instead


def test_dpo_trains_on_length_grouped_batches(tiny_model_dir, tmp_path):
    """The trainer's own micro-batches: the same examples in fewer padded tokens."""
    pytest.importorskip("mlx.core")
    from tests.mlx.test_preference_trainers import load, make_trainer

    slots, examples = {}, {}
    for strategy in ("random", "group_by_length"):
        model, tokenizer = load(tiny_model_dir("llama"))
        trainer = make_trainer("dpo", model, tokenizer, tmp_path / strategy, steps=4, lr=1e-3, batch_size=2,
                               train_sampling_strategy=strategy)
        trainer.train()
        assert all(np.isfinite(m["loss"]) for m in trainer.metrics_history if "loss" in m)
        batches = list(trainer.micro_batches(epoch=0))
        slots[strategy] = sum(int(np.prod(batch[0].shape)) for batch in batches)
        examples[strategy] = sum(int(batch[0].shape[0]) for batch in batches)
    assert examples["random"] == examples["group_by_length"] == 2 * len(trainer.train_examples)
    assert slots["group_by_length"] < slots["random"]  # (the example pairs vary little in length)
