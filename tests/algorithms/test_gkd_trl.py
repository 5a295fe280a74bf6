"""GKD's generalized JSD against TRL 1.16's own code: ``DistillationTrainer``'s
``_chunked_divergence_loss`` (called with hidden states = the logits and an identity LM head, so
its projection returns the logits unchanged) and ``GKDTrainer.generalized_jsd_loss``, on torch
and MLX arrays, for beta in {0, 0.5, 1}, a temperature != 1 and masked (-100 label) tokens."""

import warnings

import numpy as np
import pytest

from algorithms.gkd import chunked_token_divergence, divergence_loss, generalized_jsd_loss

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

B, K, V = 3, 7, 11
BETAS = (0.0, 0.5, 1.0)


def trl_distillation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    return _chunked_divergence_loss


def trl_gkd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    student = (rng.standard_normal((B, K, V)) * 2).astype(np.float32)
    teacher = (rng.standard_normal((B, K, V)) * 2).astype(np.float32)
    mask = np.ones((B, K), dtype=np.float32)
    mask[0, :2] = 0  # prompt positions
    mask[1, 5:] = 0  # padding after a short completion
    mask[2, 0] = 0
    return student, teacher, mask


def as_backend(name, values):
    if name == "torch":
        return torch.from_numpy(np.array(values))
    import mlx.core as mx

    return mx.array(values)


def trl_distillation_values(student, teacher, mask, beta, temperature):
    """(loss, entropy per token) of TRL's DistillationTrainer loss on these logits."""
    eye = torch.eye(V)
    loss, entropy_sum, count = trl_distillation()(torch.from_numpy(student), torch.from_numpy(teacher), eye, eye,
                                                  torch.from_numpy(mask), beta, temperature=temperature)
    return float(loss), float(entropy_sum / count)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_matches_trl_distillation_trainer(backend, beta, temperature):
    student, teacher, mask = inputs()
    expected_loss, expected_entropy = trl_distillation_values(student, teacher, mask, beta, temperature)
    loss, metrics = generalized_jsd_loss(as_backend(backend, student), as_backend(backend, teacher),
                                         as_backend(backend, mask), beta=beta, temperature=temperature)
    assert float(loss) == pytest.approx(expected_loss, abs=1e-5, rel=1e-5)
    assert float(metrics["entropy"]) == pytest.approx(expected_entropy, abs=1e-5, rel=1e-5)
    assert expected_loss > 0.05  # the inputs differ: a loss of 0 would prove nothing


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("beta", BETAS)
def test_chunked_divergence_on_counted_positions_matches_trl(backend, beta):
    """What the trainers compute: only the counted positions, a few tokens at a time."""
    student, teacher, mask = inputs(1)
    expected_loss, expected_entropy = trl_distillation_values(student, teacher, mask, beta, 0.7)
    keep = mask.reshape(-1) > 0
    s = as_backend(backend, student.reshape(-1, V)[keep])
    t = as_backend(backend, teacher.reshape(-1, V)[keep])
    per_token, entropy = chunked_token_divergence(lambda a, b: s[a:b], lambda a, b: t[a:b], int(keep.sum()), beta,
                                                  temperature=0.7, chunk_tokens=4)
    loss, metrics = divergence_loss(per_token, entropy=entropy)
    assert float(loss) == pytest.approx(expected_loss, abs=1e-5, rel=1e-5)
    assert float(metrics["entropy"]) == pytest.approx(expected_entropy, abs=1e-5, rel=1e-5)
    # Under gradient accumulation the step's token count divides instead (TRL's num_items_in_batch).
    eye = torch.eye(V)
    trl_loss, _, _ = trl_distillation()(torch.from_numpy(student), torch.from_numpy(teacher), eye, eye,
                                        torch.from_numpy(mask), beta, num_items_in_batch=40, temperature=0.7)
    loss, _ = divergence_loss(per_token, num_items_in_batch=40)
    assert float(loss) == pytest.approx(float(trl_loss), abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_matches_trl_gkd_trainer_with_minus_100_labels(backend, beta):
    student, teacher, mask = inputs(2)
    labels = np.where(mask > 0, 5, -100)
    expected = trl_gkd()(torch.from_numpy(student), torch.from_numpy(teacher), labels=torch.from_numpy(labels),
                         beta=beta, temperature=1.3)
    loss, _ = generalized_jsd_loss(as_backend(backend, student), as_backend(backend, teacher),
                                   as_backend(backend, (labels != -100).astype(np.float32)), beta=beta,
                                   temperature=1.3)
    assert float(loss) == pytest.approx(float(expected), abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("beta", BETAS)
def test_student_gradient_matches_trl(beta):
    """The gradient w.r.t. the student's logits (TRL's hand-written backward vs autograd here); the
    teacher gets none."""
    student, teacher, mask = inputs(3)
    eye = torch.eye(V)
    theirs = torch.from_numpy(student).requires_grad_(True)
    loss, _, _ = trl_distillation()(theirs, torch.from_numpy(teacher), eye, eye, torch.from_numpy(mask), beta,
                                    temperature=0.7)
    loss.backward()
    ours = torch.from_numpy(student).requires_grad_(True)
    teacher_ours = torch.from_numpy(teacher).requires_grad_(True)
    loss, _ = generalized_jsd_loss(ours, teacher_ours, torch.from_numpy(mask), beta=beta, temperature=0.7)
    loss.backward()
    assert torch.allclose(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5)
    assert float(ours.grad.abs().sum()) > 1e-3
    assert teacher_ours.grad is None or float(teacher_ours.grad.abs().sum()) == 0.0


def test_beta_outside_unit_interval_is_an_error():
    student, teacher, mask = inputs()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(torch.from_numpy(student), torch.from_numpy(teacher), beta=1.5)
