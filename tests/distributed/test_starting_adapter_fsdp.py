"""A trained starting adapter as π_ref under FSDP2 (issue 15, item 4): two ranks (Gloo on the CPU)
whose weights are sharded train DPO and GRPO from an SFT-style adapter as one process does.

The reference's adapter weights are copied into the adapter layers between steps, when the
weights are gathered, and the trained ones copied back; so the per-step numbers and the final
adapter equal the single process's (``test_torch_distributed``'s comparison), and the first step
starts at the reference (DPO's margin and GRPO's KL are 0).
"""

import pytest

from tests.distributed.test_torch_distributed import (PAIRS, PROMPTS, REWARD_FILE, assert_same_training, records,
                                                      run)

SCRIPT = """
import json, sys
import macft

algorithm, adapter, out, accumulation, fsdp, data = sys.argv[1:7]
model, tokenizer = macft.FastLanguageModel.from_pretrained(adapter)
common = dict(output_dir=out, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=int(accumulation),
              logging_steps=1, learning_rate=5e-2, beta=0.1, disable_tqdm=True, seed=3, fsdp=fsdp or None)
rows = json.loads(data)
if algorithm == "dpo":
    trainer = macft.DPOTrainer(model=model, processing_class=tokenizer, train_dataset=rows,
                               args=macft.DPOConfig(**common))
else:
    from macft.rewards import load_reward_functions
    config = macft.GRPOConfig(num_generations=2, max_completion_length=4, temperature=1.0, **common)
    trainer = macft.GRPOTrainer(model=model, processing_class=tokenizer, train_dataset=rows, args=config,
                                reward_funcs=load_reward_functions([sys.argv[7]]))
trainer.train()
"""


@pytest.fixture
def trained_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """An adapter directory with non-zero LoRA weights (lora_b too): what an SFT run leaves."""
    import torch

    monkeypatch.setenv("MACFT_KERNELS", "reference")
    from cuda_bridge.fast import FastLanguageModel
    from cuda_bridge.lora import save_adapter

    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.0, use_gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return save_adapter(model, tmp_path / "sft_adapter")


@pytest.mark.parametrize("algorithm, rows, first_step_key",
                         [("dpo", PAIRS, "rewards/margins"), ("grpo", PROMPTS, "kl")])
def test_sharded_ranks_train_from_the_starting_adapter_as_one_process(trained_adapter, tmp_path, algorithm, rows,
                                                                      first_step_key):
    import json

    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    reward = tmp_path / "my_reward.py"
    reward.write_text(REWARD_FILE)
    data = json.dumps(rows)
    one, sharded = tmp_path / "one_process", tmp_path / "fsdp"
    run(algorithm, [trained_adapter, one, 2, "", data, reward], script=script)
    run(algorithm, [trained_adapter, sharded, 1, "full_shard", data, reward], ranks=2, script=script, timeout=240)
    assert_same_training(sharded, one)
    steps = [r for r in records(one) if "loss" in r]
    assert steps[0][first_step_key] == pytest.approx(0.0, abs=1e-5)  # π_ref is the starting policy
    assert abs(steps[-1][first_step_key]) > 1e-4  # ...and the policy moved away from it
