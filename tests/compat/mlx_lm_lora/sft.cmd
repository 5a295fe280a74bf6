# mlx-lm-lora README, "Supervised Fine-Tuning (SFT)" command.
# Origin: Goekdeniz-Guelmez/mlx-lm-lora, README.md, commit 075a10db57e15149e9b968db5684c16dba4f0611.
# changed: no --model (embedded default model); --data mlx-community/hermes-3 -> a local directory
#          in the same schema; --iters 1000 -> 3.
# The runner replaces the program `mlx_lm_lora.train` with `python -m macft.train`
# (and runs it once more as `macft train`), and {DATA} with tests/compat/data.
mlx_lm_lora.train --train --train-mode sft --data {DATA}/mlx/hermes3 --batch-size 4 --learning-rate 1e-5 --iters 3
