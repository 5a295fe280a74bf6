"""Supervised fine-tuning: masked token negative log-likelihood.

    L_SFT = − Σ_{b,t} m_{b,t} · log π_θ(y_{b,t} | y_{b,<t}) / N

with m the label mask (completion / assistant tokens, or every token with train-on-prompt) and
N = Σ m, the number of label tokens. Under gradient accumulation pass N for the whole
accumulated batch as `num_items_in_batch`, so that every label token weighs the same whatever
micro-batch it falls in (TRL 1.16 `SFTTrainer.compute_loss`, loss_type="nll").

Maximum-likelihood training of a causal LM; see e.g. Radford et al. 2018 and, for instruction
tuning, Ouyang et al. 2022 (arXiv:2203.02155).
"""

from __future__ import annotations

from . import ops
from .masked import as_mask


def sft_loss(logps, mask, num_items_in_batch=None):
    """(loss, metrics): mean of −logps over the label tokens.

    logps: (B, T) log-probs of the target tokens; mask: (B, T) 0/1 label mask;
    num_items_in_batch: optional token count to divide by instead of Σ mask (an int or a scalar
    array), for gradient accumulation.
    """
    m = as_mask(mask, logps)
    num_tokens = ops.sum(m)
    denominator = ops.clip(num_tokens, 1.0, None) if num_items_in_batch is None else num_items_in_batch
    loss = -ops.sum(logps * m) / denominator
    return loss, {"num_tokens": ops.stop_gradient(num_tokens)}
