# mlx-lm-lora README, "Odds Ratio Preference Optimization (ORPO)" command.
# Origin: Goekdeniz-Guelmez/mlx-lm-lora, README.md, commit 075a10db57e15149e9b968db5684c16dba4f0611.
# changed: no --model; --data mlx-community/Human-Like-DPO -> local directory, same schema;
#          --iters 2 added (the README leaves the default, 1000).
mlx_lm_lora.train --train --train-mode orpo --data {DATA}/mlx/human_like_dpo --beta 0.1 --reward-scaling 1.0 --iters 2
