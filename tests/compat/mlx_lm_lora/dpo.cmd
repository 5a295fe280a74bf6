# mlx-lm-lora README, "Direct Preference Optimization (DPO)" command.
# Origin: Goekdeniz-Guelmez/mlx-lm-lora, README.md, commit 075a10db57e15149e9b968db5684c16dba4f0611.
# changed: no --model and no --reference-model-path (both were the same model: the embedded
#          default is used for both); --data mlx-community/Human-Like-DPO -> local directory,
#          same schema; --iters 2 added (the README leaves the default, 1000).
mlx_lm_lora.train --train --train-mode dpo --data {DATA}/mlx/human_like_dpo --beta 0.1 --dpo-cpo-loss-type sigmoid --iters 2
