"""The bridge's half of the judges (``macft.judges``; ``macft.mlx.judges`` on MLX): running an
LLM judge and loading a reward model."""

import numpy as np
import torch

from macft.judges import LLMPairwiseJudge

JUDGE_BATCH_SIZE = 8  # contexts per forward pass


@torch.no_grad()
def next_token_logprobs(model, contexts: list[list[int]], token_ids: list[tuple[int, ...]], pad_id: int = 0,
                        batch_size: int = JUDGE_BATCH_SIZE) -> torch.Tensor:
    """(N, K) float32 log-probs of the K given tokens right after each context.

    Contexts are right-padded, so under causal attention the padding never reaches the last real
    position of a row, which is the only one read; the LM head runs on that position only.
    """
    from cuda_bridge.logps import _head, hidden_states

    device = next(model.parameters()).device
    head = _head(model)
    rows = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        width = max(len(c) for c in chunk)
        padded = torch.tensor([list(c) + [pad_id] * (width - len(c)) for c in chunk], device=device)
        last = torch.tensor([len(c) - 1 for c in chunk], device=device)
        index = torch.arange(len(chunk), device=device)
        if head is None:  # soft-capped or scaled logits: the model's own head
            logits = model(input_ids=padded, use_cache=False).logits[index, last]
        else:
            weight, bias = head
            hidden = hidden_states(model, padded)[index, last]
            logits = hidden.float() @ weight.float().t() + (0 if bias is None else bias.float())
        logps = logits.float().log_softmax(-1)
        wanted = torch.tensor([list(ids) for ids in token_ids[start:start + batch_size]], device=device)
        rows.append(logps.gather(-1, wanted))
    return torch.cat(rows)


def llm_judge(model_name=None) -> LLMPairwiseJudge:
    """A pairwise judge running ``model_name`` (hub id, local HF/MLX dir, .gguf; None: the embedded
    default model), frozen, in evaluation mode."""
    from cuda_bridge.model import load_pretrained

    model, tokenizer = load_pretrained(model_name)
    model.requires_grad_(False)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def answer_logprobs(contexts, answer_ids):
        return next_token_logprobs(model, contexts, answer_ids, pad_id=pad_id).cpu().numpy().astype(np.float64)

    judge = LLMPairwiseJudge(tokenizer, answer_logprobs, name=f"llm:{model.macft.name_or_path}")
    judge.model = model
    return judge


def load_reward_model(path, share_base_with=None):
    """A trained reward model (``cuda_bridge.reward_model``, from either backend) with
    ``score(prompt_ids, completion_ids)``; where its base is ``share_base_with``'s, the base weights
    are shared, not loaded twice."""
    from cuda_bridge.reward_model import load_reward_model as load

    return load(path, share_base_with=share_base_with)
