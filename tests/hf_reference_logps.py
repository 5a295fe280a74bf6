"""The oracle of the starting-adapter reference tests of both backends: HF transformers (with peft
for an adapter directory) scoring the same rows, per-token log-probs by TRL's
``selective_log_softmax``, as TRL's DPOTrainer scores its reference ("ref" adapter) rows."""

import numpy as np
import torch

PREFERENCE_ROWS = [
    {"prompt": "Can you help me with my homework?", "chosen": "Of course! Glad to help.",
     "rejected": "No. Do it yourself."},
    {"prompt": "Please help me with a birthday card.", "chosen": "Certainly, let's start.",
     "rejected": "Not my problem."},
    {"prompt": "I need a hand with pancakes.", "chosen": "Sure thing! Flour first.",
     "rejected": "Figure it out alone."},
    {"prompt": "Could you fix my bike?", "chosen": "Of course! Show me the chain.",
     "rejected": "Go away."},
]


def hf_model(model_dir, adapter_dir=None):
    """The HF transformers model of ``model_dir`` in float32, with ``adapter_dir`` loaded by peft."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return model


def completion_logp_sums(model_dir, input_ids, target_mask, adapter_dir=None) -> np.ndarray:
    """(R,) float64: Σ_t target_mask[r, t] · log p(input_ids[r, t+1] | input_ids[r, :t+1]) under the HF
    model (rows are right-padded, so causal attention never sees the pads)."""
    from trl.trainer.utils import selective_log_softmax

    model = hf_model(model_dir, adapter_dir)
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
        per_token = selective_log_softmax(logits, ids[:, 1:])
    return (per_token.double().numpy() * np.asarray(target_mask, dtype=np.float64)).sum(axis=1)
