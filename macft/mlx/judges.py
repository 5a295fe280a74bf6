"""The MLX half of the judges (``macft.judges``): running an LLM judge and loading a reward model."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from macft.judges import LLMPairwiseJudge

JUDGE_BATCH_SIZE = 8  # contexts per forward pass


def next_token_logprobs(model, contexts: list[list[int]], token_ids: list[tuple[int, ...]], pad_id: int = 0,
                        batch_size: int = JUDGE_BATCH_SIZE) -> mx.array:
    """(N, K) log-probs of the K given tokens right after each context.

    Contexts are right-padded, so under causal attention the padding never reaches the last
    real position of a row, which is the only one read; the LM head runs on that position only.
    """
    rows = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        width = max(len(c) for c in chunk)
        padded = mx.array([list(c) + [pad_id] * (width - len(c)) for c in chunk])
        last = mx.array([len(c) - 1 for c in chunk])
        logits = last_position_logits(model, padded, last)
        logps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        wanted = mx.array([list(ids) for ids in token_ids[start:start + batch_size]])
        rows.append(mx.take_along_axis(logps, wanted, axis=-1))
    return mx.concatenate(rows, axis=0)


def last_position_logits(model, input_ids, last) -> mx.array:
    """(B, V) float32 logits at position ``last[b]`` of each row, without the LM head's work on the
    other positions where the model has mlx-lm's plain layout (backbone, then lm_head or tied
    embeddings); other models run whole."""
    config = model.macft.config if hasattr(model, "macft") else {}
    inner = model.get("model") if isinstance(model, dict) else None
    plain = (isinstance(inner, nn.Module) and hasattr(inner, "layers") and not config.get("final_logit_softcapping")
             and (isinstance(model.get("lm_head"), nn.Module) or hasattr(inner, "embed_tokens")))
    if not plain:
        return model(input_ids)[mx.arange(input_ids.shape[0]), last].astype(mx.float32)
    hidden = inner(input_ids)[mx.arange(input_ids.shape[0]), last]
    head = model.get("lm_head")
    logits = head(hidden) if isinstance(head, nn.Module) else inner.embed_tokens.as_linear(hidden)
    return logits.astype(mx.float32)


def llm_judge(model_name=None) -> LLMPairwiseJudge:
    """A pairwise judge running ``model_name`` (hub id, local HF/MLX dir, .gguf; None: the
    embedded default model), frozen, in evaluation mode."""
    from macft.mlx.model import load_pretrained

    model, tokenizer = load_pretrained(model_name)
    model.freeze()
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def answer_logprobs(contexts, answer_ids):
        return np.array(next_token_logprobs(model, contexts, answer_ids, pad_id=pad_id))

    judge = LLMPairwiseJudge(tokenizer, answer_logprobs, name=f"llm:{model.macft.name_or_path}")
    judge.model = model
    return judge


def load_reward_model(path, share_base_with=None):
    """A trained reward model (``macft.mlx.reward_model``) with ``score(prompt_ids, completion_ids)``;
    where its base is ``share_base_with``'s, the base weights are shared, not loaded twice."""
    from macft.mlx.reward_model import load_reward_model as load

    return load(path, share_base_with=share_base_with)
