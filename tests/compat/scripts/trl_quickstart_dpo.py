# Reproduces TRL's DPO quick start: DPOTrainer(model="<hub id>", ref_model="<hub id>",
# train_dataset=trl-lib/ultrafeedback_binarized) with TRL's defaults (implicit-prompt
# conversational preference pairs, full fine-tuning against a separate reference model).
# Origin: huggingface/trl, docs/source/quickstart.md,
#         commit 9ad1e8932af882ee001986cb5138139e905538fb (Apache-2.0; rewritten here).
# Only the model, the data and the step counts differ (marked "# changed:"), plus the import.
from pathlib import Path

from macft import DPOConfig, DPOTrainer
from datasets import load_dataset

from macft.default_model import default_model_dir

DATA = Path(__file__).resolve().parent.parent / "data"  # changed: local copies of the data sets
MODEL = str(default_model_dir("hf"))  # changed: "Qwen/Qwen2.5-0.5B-Instruct" -> the embedded default

trainer = DPOTrainer(
    model=MODEL,
    ref_model=MODEL,
    # changed: load_dataset("trl-lib/ultrafeedback_binarized", split="train") -> local JSONL, same schema
    train_dataset=load_dataset("json", data_files=str(DATA / "trl_ultrafeedback_binarized.jsonl"), split="train"),
    args=DPOConfig(max_steps=2, logging_steps=1),  # changed: added, 2 steps logged each step
)
trainer.train()
