"""End to end on the real SmolLM2-135M-Instruct (MLX, float32, CPU): LoRA SFT on 60 of the chat
examples packed and unpacked, the same epochs and about the same number of steps, reaches the same held-out
loss within noise."""

import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data" / "chat"

pytestmark = pytest.mark.slow


def half_of_the_chat_examples(tmp_path) -> Path:
    """The first 60 training rows (CI time) and all 20 validation rows."""
    data = tmp_path / "chat"
    data.mkdir()
    (data / "train.jsonl").write_text("".join((EXAMPLES / "train.jsonl").read_text().splitlines(True)[:60]))
    (data / "valid.jsonl").write_text((EXAMPLES / "valid.jsonl").read_text())
    return data


def train(tmp_path, data, packing: bool, batch_size: int) -> list[dict]:
    from macft import FastLanguageModel, SFTConfig, SFTTrainer
    from macft.default_model import default_model_dir

    model, tokenizer = FastLanguageModel.from_pretrained(str(default_model_dir("mlx")), max_seq_length=256)
    FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    out = tmp_path / ("packed" if packing else "unpacked")
    args = SFTConfig(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=batch_size,
                     learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1, eval_on_start=True,
                     eval_steps=0, eval_batches=-1, save_steps=0, disable_tqdm=True, max_length=256,
                     packing=packing, seed=3)
    SFTTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=str(data)).train()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_packed_and_unpacked_adapters_reach_the_same_eval_loss(tmp_path):
    from macft.data import load_sft_dataset
    from macft.default_model import default_model_dir
    from macft.packing import pack_examples
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir("hf"))
    data = half_of_the_chat_examples(tmp_path)
    examples, _ = load_sft_dataset(str(data), tokenizer, 256)
    rows, _ = pack_examples(examples, 256)
    packed_batch = 2
    # About as many optimizer steps per epoch both ways: each packed step holds ~len/rows more samples.
    unpacked_batch = max(1, round(packed_batch * len(examples) / len(rows)))
    packed, unpacked = train(tmp_path, data, True, packed_batch), train(tmp_path, data, False, unpacked_batch)
    start = [m["eval_loss"] for m in unpacked if "eval_loss" in m][0]
    assert start == pytest.approx([m["eval_loss"] for m in packed if "eval_loss" in m][0], abs=1e-4)
    final_packed = [m["eval_loss"] for m in packed if "eval_loss" in m][-1]
    final_unpacked = [m["eval_loss"] for m in unpacked if "eval_loss" in m][-1]
    steps = (sum("tokens" in m for m in packed), sum("tokens" in m for m in unpacked))
    print(f"eval loss: start {start:.4f}, packed {final_packed:.4f}, unpacked {final_unpacked:.4f}; steps {steps}")
    assert final_packed < start - 0.1 and final_unpacked < start - 0.1
    # Noise: the two runs see the samples in other groupings (the rows, the batches); measured at 3e-4 for
    # the same 14 steps, 0.18 vs 0.10 after a drop of 1.1 (7%). Here: within 10% of the drop, or 0.05.
    drop = start - min(final_packed, final_unpacked)
    assert abs(final_packed - final_unpacked) < max(0.05, 0.1 * drop)
    padding = [sum(m["padding_fraction"] for m in run if "tokens" in m) / steps[i] for i, run in enumerate((packed, unpacked))]
    assert padding[0] < padding[1]
