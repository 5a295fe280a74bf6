# Reproduces TRL's SFT quick start: SFTTrainer(model="<hub id>", train_dataset=Capybara) with
# TRL's defaults (no config given by the user; full fine-tuning, messages format).
# Origin: huggingface/trl, docs/source/quickstart.md (also README.md "SFTTrainer"),
#         commit 9ad1e8932af882ee001986cb5138139e905538fb (Apache-2.0; rewritten here).
# Only the model, the data and the step counts differ (marked "# changed:"), plus the import.
from pathlib import Path

from macft import SFTConfig, SFTTrainer
from datasets import load_dataset

from macft.default_model import default_model_dir

DATA = Path(__file__).resolve().parent.parent / "data"  # changed: local copies of the data sets

trainer = SFTTrainer(
    model=str(default_model_dir("hf")),  # changed: "Qwen/Qwen2.5-0.5B" -> the embedded default model
    # changed: load_dataset("trl-lib/Capybara", split="train") -> local JSONL, same schema
    train_dataset=load_dataset("json", data_files=str(DATA / "capybara.jsonl"), split="train"),
    args=SFTConfig(max_steps=2, logging_steps=1),  # changed: added, 2 steps logged each step
)
trainer.train()
