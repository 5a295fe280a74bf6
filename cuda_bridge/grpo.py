"""GRPO and the variants that are its settings (GSPO, Dr. GRPO, DAPO) on the bridge.

The trainer is ``macft.trainers.grpo.GRPOLogic`` (rollouts, rewards, DAPO's dynamic sampling,
advantages, the loss, metrics) over ``cuda_bridge.trainer.Trainer``; rollouts decode with
``cuda_bridge.sampling`` (one prefill per prompt, its KV cache repeated for the group). This
module adds the completions' log-probs.
"""

import torch

from cuda_bridge.logps import sequence_logps
from cuda_bridge.online import TorchOnline
from cuda_bridge.trainer import Trainer
from macft.trainers.grpo import GRPOLogic, whole_sequence_layout


def completion_logps(model, prompt_ids: list, completion_ids: torch.Tensor, pad_id: int = 0,
                     temperature: float = 1.0, with_entropy: bool = False):
    """(N, C) float32 log-probs of each completion token given its prompt and the tokens before it,
    under logits / ``temperature`` (the sampling temperature: TRL scores the rollouts so; the fused
    kernel scales the logits chunk by chunk, as for PPO).

    Each row runs whole, [prompt | completion | padding], right-padded so causal attention keeps
    the padding out of every real position, through the fused head + log-softmax (no (N, T, V)
    logits); completion token j of row i is read at position len(prompt_i) - 1 + j. With ``with_entropy``:
    (log-probs, entropies (N, C)) of each next-token distribution (top_entropy_quantile; the
    kernel computes them in the same pass), entropies without gradient.
    """
    ids, positions = whole_sequence_layout(prompt_ids, completion_ids.detach().cpu().numpy(), pad_id)
    device = completion_ids.device
    scored = sequence_logps(model, torch.as_tensor(ids, dtype=torch.long, device=device), temperature=temperature,
                            with_entropy=with_entropy)
    index = torch.as_tensor(positions, device=device)
    if with_entropy:
        logps, entropies = scored
        return logps.gather(1, index), entropies.detach().gather(1, index)
    return scored.gather(1, index)


class GRPOTrainer(GRPOLogic, TorchOnline, Trainer):
    __doc__ = GRPOLogic.__doc__

    def completion_logps(self, model, prompt_ids, completion_ids, with_entropy=False):
        return completion_logps(model, prompt_ids, completion_ids, self.pad_id, self.args.temperature, with_entropy)
