# mlx-lm-lora README, "Group Relative Policy Optimization (GRPO)" command.
# Origin: Goekdeniz-Guelmez/mlx-lm-lora, README.md, commit 075a10db57e15149e9b968db5684c16dba4f0611.
# changed: no --model; --data mlx-community/gsm8k -> local directory, same schema;
#          --max-completion-length 512 -> 8; --iters 2 added (the README leaves the default);
#          --reward-functions "r1_accuracy_reward_func,r1_soft_format_reward_func" -> the names mlx-lm-lora 5.10.2 registers
#          (its registry has no accuracy_reward/format_reward: the README's command fails there too).
mlx_lm_lora.train --train --train-mode grpo --data {DATA}/mlx/gsm8k --group-size 4 --epsilon 1e-4 --max-completion-length 8 --temperature 0.8 --reward-functions "r1_accuracy_reward_func,r1_soft_format_reward_func" --reward-weights "[0.7, 0.3]" --iters 2
