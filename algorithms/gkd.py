"""Generalized knowledge distillation (GKD): Agarwal et al., "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", arXiv:2306.13649 (ICLR 2024), as TRL 1.16
computes it (``DistillationTrainer``'s ``_chunked_divergence_loss``; the older
``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` gives the same numbers).

At every completion token t the student's and the teacher's next-token distributions are
compared over the whole vocabulary, both under the temperature τ:

    p_S = softmax(z_S / τ),   p_T = softmax(z_T / τ)          (z: logits of that position)

and the divergence is the generalized Jensen-Shannon divergence of the paper's Eq. (1), with
β interpolating between the two KL directions:

    β = 0:      D = KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S)          (forward KL)
    β = 1:      D = KL(p_S ‖ p_T) = Σ_v p_S (log p_S − log p_T)          (reverse KL)
    0 < β < 1:  M = (1 − β)·p_S + β·p_T,
                D = β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M)                  (JSD_β; β = 0.5: the JSD)

log M is formed as logaddexp(log p_S + log(1 − β), log p_T + log β), so nothing underflows.
The loss averages D over the completion tokens (TRL's token-level reduction):

    L = Σ_t m_t·D_t / N,   N = Σ m  (clamped at 1), or the token count of the whole optimizer
                                     step (``num_items_in_batch``) under gradient accumulation.

The gradient flows to the student only; the teacher's logits are constants. The student's
entropy −Σ_v p_S log p_S is returned beside the loss (TRL logs it as ``entropy``).

Memory: the logits over the vocabulary are the big tensors. ``chunked_token_divergence`` takes
functions that give the logits of a range of tokens (the backend projects hidden states through
each model's head), so the forward pass never holds more than ``chunk_tokens`` rows of either
model's logits besides what autodiff keeps for the student's backward; and only completion
positions are ever projected (the prompt's logits are never formed).
"""

from __future__ import annotations

import math

from . import ops

# Rows of (tokens x vocabulary) logits formed at a time by the chunked divergence: 1024 x 150k
# float32 is 600 MB per model.
CHUNK_TOKENS = 1024


def _check_beta(beta: float):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0.0, 1.0], got {beta}")


def token_divergence(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
    """(per-token divergence (N,), student entropy (N,)) of logits (N, V) of the same N positions.

    Computed in float32 at least; the teacher's logits get no gradient, the entropy none either."""
    _check_beta(beta)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student = ops.to_float(student_logits)
    teacher = ops.stop_gradient(ops.cast_like(ops.to_float(teacher_logits), student))
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    log_ps = ops.log_softmax(student, axis=-1)
    log_pt = ops.log_softmax(teacher, axis=-1)
    p_s, p_t = ops.exp(log_ps), ops.exp(log_pt)
    if beta == 0.0:
        divergence = ops.sum(p_t * (log_pt - log_ps), axis=-1)
    elif beta == 1.0:
        divergence = ops.sum(p_s * (log_ps - log_pt), axis=-1)
    else:
        log_m = ops.logaddexp(log_ps + math.log(1.0 - beta), log_pt + math.log(beta))
        divergence = ops.sum(beta * p_t * (log_pt - log_m) + (1.0 - beta) * p_s * (log_ps - log_m), axis=-1)
    entropy = ops.stop_gradient(-ops.sum(p_s * log_ps, axis=-1))
    return divergence, entropy


def chunked_token_divergence(student_logits_of, teacher_logits_of, num_tokens: int, beta: float,
                             temperature: float = 1.0, chunk_tokens: int = CHUNK_TOKENS):
    """``token_divergence`` over ``num_tokens`` positions, ``chunk_tokens`` at a time.

    ``student_logits_of(start, end)`` / ``teacher_logits_of(start, end)`` return the (end − start, V)
    logits of those positions (the backend's head applied to a slice of hidden states)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    divergences, entropies = [], []
    for start in range(0, num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, num_tokens)
        divergence, entropy = token_divergence(student_logits_of(start, end), teacher_logits_of(start, end), beta,
                                               temperature)
        divergences.append(divergence)
        entropies.append(entropy)
    if len(divergences) == 1:
        return divergences[0], entropies[0]
    return ops.concatenate(divergences), ops.concatenate(entropies)


def divergence_loss(per_token_divergence, num_items_in_batch=None, entropy=None):
    """(loss, metrics) from the divergences of the counted tokens only (N,): Σ D / max(N, 1), or
    Σ D / ``num_items_in_batch`` (the step's token count under gradient accumulation)."""
    total = ops.sum(per_token_divergence)
    count = per_token_divergence.shape[0]
    denominator = max(count, 1) if num_items_in_batch is None else num_items_in_batch
    loss = total / denominator
    metrics = {"divergence": ops.stop_gradient(total / max(count, 1))}
    if entropy is not None:
        metrics["entropy"] = ops.stop_gradient(ops.sum(entropy) / max(count, 1))
    return loss, metrics


def generalized_jsd_loss(student_logits, teacher_logits, mask=None, beta: float = 0.5, temperature: float = 1.0,
                         num_items_in_batch=None):
    """(loss, metrics) for logits (..., V) of aligned positions and a 0/1 mask (...) of the counted
    ones (TRL's labels != -100): Σ m·D / max(Σ m, 1), or / ``num_items_in_batch``.

    The whole-tensor form (``GKDTrainer.generalized_jsd_loss``'s inputs); trainers use
    ``chunked_token_divergence`` on the counted positions only."""
    vocabulary = student_logits.shape[-1]
    divergence, entropy = token_divergence(student_logits.reshape(-1, vocabulary),
                                           teacher_logits.reshape(-1, vocabulary), beta, temperature)
    if mask is None:
        return divergence_loss(divergence, num_items_in_batch, entropy)
    m = ops.cast_like(mask.reshape(-1), divergence)
    count = ops.sum(m)
    # where, not a product: a masked position's divergence may be inf/nan (padding logits).
    total = ops.sum(ops.where(m > 0, divergence, ops.zeros_like(divergence)))
    denominator = ops.clip(count, 1.0, None) if num_items_in_batch is None else num_items_in_batch
    metrics = {"divergence": ops.stop_gradient(total / ops.clip(count, 1.0, None)),
               "entropy": ops.stop_gradient(ops.sum(ops.where(m > 0, entropy, ops.zeros_like(entropy)))
                                            / ops.clip(count, 1.0, None))}
    return total / denominator, metrics
