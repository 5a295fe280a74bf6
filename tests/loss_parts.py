"""The whole-against-parts check of ``loss_parts`` (GRPO, RLOO), for tests of either backend
(imports neither)."""

import numpy as np
import pytest


def assert_parts_give_the_whole_gradient(trainer, monkeypatch, by_tokens, gradients):
    """The first micro-batch (3 prompts x 4 completions), its masks cut to unequal lengths (so that a
    part's share of the rows and of the tokens differ), differentiated whole and then a prompt group
    at a time (LOSS_PART_TOKENS below a group): the same loss, gradient norm and gradients, each part
    counting its share of the tokens (by_tokens) or of the rows. ``gradients(trainer)``: the step's
    gradients as {name: numpy array}, after ``step_gradients``."""
    import macft.trainers.grpo as grpo_module

    trainer.seed(0)
    trainer.prepare()
    trainer.begin_training()
    (batch,) = next(trainer._step_batches())
    mask = np.ones(tuple(batch.completion_mask.shape), dtype=np.float32)
    lengths = [6, 1, 3, 6, 2, 2, 5, 4, 6, 6, 6, 3]
    for row, length in enumerate(lengths):
        mask[row, length:] = 0.0
    batch = batch._replace(completion_mask=trainer.to_array(mask), completion_tokens=float(mask.sum()))

    monkeypatch.setattr(grpo_module, "LOSS_PART_TOKENS", 10**6)
    assert len(trainer.loss_parts(batch)) == 1
    whole_loss, _, whole_norm = trainer.step_gradients([batch])
    whole = gradients(trainer)

    monkeypatch.setattr(grpo_module, "LOSS_PART_TOKENS", 1)
    fractions = [fraction for _, fraction in trainer.loss_parts(batch)]
    token_shares = [sum(lengths[4 * p:4 * p + 4]) / sum(lengths) for p in range(3)]
    assert fractions == pytest.approx(token_shares if by_tokens else [1 / 3] * 3)
    loss, _, norm = trainer.step_gradients([batch])
    assert loss == pytest.approx(whole_loss, rel=1e-5, abs=1e-7)
    assert norm == pytest.approx(whole_norm, rel=1e-5) and whole_norm > 0
    parts = gradients(trainer)
    assert parts.keys() == whole.keys() and whole
    for name, grad in parts.items():
        np.testing.assert_allclose(grad, whole[name], rtol=1e-4, atol=1e-7, err_msg=name)
