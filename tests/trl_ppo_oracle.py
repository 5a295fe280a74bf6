"""trl 1.12's PPO, run by trl's own code: the oracle for algorithms/ppo.py.

PPO left TRL after 1.12 and macft's environment has a later trl, so this script runs in a
subprocess with trl 1.12.0 first on PYTHONPATH (an install of that one wheel, `./run setup` puts it
in .oracle/trl-1.12); it imports nothing of macft. See tests/algorithms/test_ppo_trl.py.

What runs is ``trl.experimental.ppo.PPOTrainer.train`` itself for one rollout (batch of B prompts,
num_ppo_epochs=2, one minibatch) on tiny random llama policy / value / reward models on the CPU.
Only the sampling is fixed: the policy's ``generate`` (which trl's ``generate`` helper calls)
returns the given responses, and as its per-step scores the policy's own logits at temperature
plus fixed noise, so that the rollout's log-probs differ from the update's and the ratio is not 1.
Everything else is trl's: truncation at the stop token, sequence_lengths, the padding masks, the
reference and value forwards, the reward model score, the KL-shaped rewards, GAE, whitening, the
losses, the optimizer step between the two epochs, and the logged metrics.

trl's tensors are read from the frame of ``train`` by a trace function at three of its lines (the
rollout's tensors before and after trl masks the padding, and after each micro-batch's
statistics), so nothing in trl is replaced.

Usage: python trl_ppo_oracle.py SPEC.json OUT_DIR  — SPEC is a list of cases (see ``run_case``);
for case k it writes OUT_DIR/case{k}.npz (tensors) and OUT_DIR/case{k}.json (logged metrics).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROLLOUT = ("queries", "responses", "postprocessed_responses", "sequence_lengths", "padding_mask",
           "padding_mask_p1", "logprobs", "ref_logprobs", "values", "scores", "kl", "non_score_reward", "rewards",
           "advantages", "returns", "contain_eos_token", "actual_end")
UNMASKED = ("logprobs", "ref_logprobs", "values")  # before trl fills the padding
MICRO = ("micro_batch_inds", "new_logprobs", "vpred", "mb_logprobs", "mb_values", "mb_return", "mb_advantage",
         "pg_loss", "vf_loss", "loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio")


def tokenizer(vocab_size: int, pad_is_eos: bool):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                  eos_token="<eos>", pad_token="<eos>" if pad_is_eos else "<pad>",
                                  padding_side="left")
    return tok


def tiny_models(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3, num_labels=1, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(config)
    value = LlamaForSequenceClassification(config)
    reward = LlamaForSequenceClassification(config)
    return policy, value, reward


class Recorder:
    """Copies of `train`'s locals at three of its lines (found in trl's source by their text)."""

    def __init__(self, train_function):
        lines, first = inspect.getsourcelines(train_function)
        self.code = train_function.__code__

        def line_of(text):
            return first + next(i for i, line in enumerate(lines) if text in line)

        self.unmasked_line = line_of("contain_eos_token = torch.any(")
        self.rollout_line = line_of("for ppo_epoch_idx in range(args.num_ppo_epochs):")
        self.micro_line = line_of("pg_loss_stats[ppo_epoch_idx, minibatch_idx, gradient_accumulation_idx] = pg_loss")
        self.unmasked, self.rollout, self.micro = None, None, []

    def __call__(self, frame, event, arg):
        if event == "call":
            return self.local if frame.f_code is self.code else None
        return None

    def local(self, frame, event, arg):
        if event == "line" and frame.f_lineno == self.unmasked_line and self.unmasked is None:
            self.unmasked = _copy(frame.f_locals, UNMASKED)
        elif event == "line" and frame.f_lineno == self.rollout_line and self.rollout is None:
            self.rollout = _copy(frame.f_locals, ROLLOUT)
        elif event == "line" and frame.f_lineno == self.micro_line:
            self.micro.append(_copy(frame.f_locals, MICRO))
        return self.local


def _copy(local, names):
    out = {}
    for name in names:
        value = local[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
        out[name] = np.array(value.numpy() if isinstance(value, torch.Tensor) else value)
    return out


def run_case(case: dict, out_dir: Path, index: int):
    """case: pad_is_eos, queries (B lists of token ids, no pad/EOS), responses (B lists of
    response_length ids, as generate would return them), settings (PPOConfig fields), seed."""
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer

    vocab_size = case.get("vocab_size", 24)
    tok = tokenizer(vocab_size, case["pad_is_eos"])
    policy, value_model, reward_model = tiny_models(vocab_size, case["seed"])
    queries = [list(q) for q in case["queries"]]
    responses = {tuple(q): list(r) for q, r in zip(queries, case["responses"])}
    noise = torch.Generator().manual_seed(case["seed"] + 1)
    settings = case["settings"]
    temperature = settings.get("temperature", 0.7)

    def fixed_generate(input_ids, attention_mask, generation_config, **_):
        """The policy's generate: the fixed responses; as scores, its logits at temperature + noise."""
        batch = [responses[tuple(row.tolist())] for row in input_ids]
        sequences = torch.cat([input_ids, torch.tensor(batch, dtype=input_ids.dtype)], 1)
        with torch.no_grad():
            logits = policy(input_ids=sequences[:, :-1]).logits[:, input_ids.shape[1] - 1:]
        logits = logits / (temperature + 1e-7) + 0.5 * torch.randn(logits.shape, generator=noise)
        return types.SimpleNamespace(sequences=sequences, scores=tuple(logits.unbind(1)))

    policy.generate = fixed_generate
    batch = len(queries)
    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(output_dir=tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                         num_mini_batches=1, local_rollout_forward_batch_size=batch, total_episodes=batch,
                         response_length=len(case["responses"][0]), stop_token="eos", num_sample_generations=0,
                         use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
                         disable_tqdm=True, seed=case["seed"], learning_rate=settings.pop("learning_rate", 3e-2),
                         **settings)
        data = [{"input_ids": q} for q in queries]
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
                             train_dataset=data, eval_dataset=data, value_model=value_model)
        logged = []
        trainer.log = lambda metrics, *a, **k: logged.append(dict(metrics))
        recorder = Recorder(ppo_trainer.PPOTrainer.train)
        sys.settrace(recorder)
        try:
            trainer.train()
        finally:
            sys.settrace(None)
    assert recorder.rollout is not None and recorder.micro, "the trace did not reach train's lines"
    arrays = {f"rollout/{k}": v for k, v in recorder.rollout.items()}
    arrays.update({f"unmasked/{k}": v for k, v in recorder.unmasked.items()})
    for number, micro in enumerate(recorder.micro):
        arrays.update({f"micro{number}/{k}": v for k, v in micro.items()})
    np.savez(out_dir / f"case{index}.npz", **arrays)
    (out_dir / f"case{index}.json").write_text(json.dumps({
        "metrics": logged[0], "micro_batches": len(recorder.micro), "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id}))


def main():
    import trl

    assert trl.__version__ == "1.12.0", f"the PPO oracle needs trl 1.12.0 first on the path, got {trl.__version__}"
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    for index, case in enumerate(spec):
        run_case(case, out_dir, index)


if __name__ == "__main__":
    main()
