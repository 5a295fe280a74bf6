"""The settings of transformers' TrainingArguments and TRL's configs, with their defaults.

``macft.config`` accepts every one of them (so a TRL/Unsloth script runs with only its import
changed) without importing transformers or trl, which take seconds to import and may not be
installed. Generated from transformers 5.25 and trl 1.16; ``tests/test_trl_arguments.py`` checks
the tables against the installed packages. PPOConfig (trl 1.12) and XPOConfig (trl 1.13) are no
longer in TRL: their tables are written from those releases.
"""

# fmt: off
TRAINING_ARGUMENTS_DEFAULTS = {
    'output_dir': None, 'per_device_train_batch_size': 8, 'num_train_epochs': 3.0, 'max_steps': -1,
    'learning_rate': 5e-05, 'lr_scheduler_type': 'linear', 'lr_scheduler_kwargs': None, 'warmup_steps': 0,
    'optim': 'adamw_torch_fused', 'optim_args': None, 'weight_decay': 0.0, 'adam_beta1': 0.9, 'adam_beta2':
    0.999, 'adam_epsilon': 1e-08, 'optim_target_modules': None, 'gradient_accumulation_steps': 1,
    'average_tokens_across_devices': True, 'max_grad_norm': 1.0, 'label_smoothing_factor': 0.0, 'bf16': False,
    'fp16': False, 'bf16_full_eval': False, 'fp16_full_eval': False, 'tf32': None, 'activation_checkpointing':
    None, 'activation_checkpointing_kwargs': None, 'gradient_checkpointing': None,
    'gradient_checkpointing_kwargs': None, 'torch_compile': False, 'torch_compile_backend': None,
    'torch_compile_mode': None, 'use_liger_kernel': False, 'liger_kernel_config': None, 'use_cache': False,
    'neftune_noise_alpha': None, 'torch_empty_cache_steps': None, 'auto_find_batch_size': False,
    'logging_strategy': 'steps', 'logging_steps': 500, 'logging_first_step': False, 'log_on_each_node': True,
    'logging_nan_inf_filter': True, 'include_num_input_tokens_seen': 'no', 'log_level': 'passive',
    'log_level_replica': 'warning', 'disable_tqdm': None, 'report_to': 'none', 'run_name': None, 'project':
    'huggingface', 'trackio_space_id': None, 'trackio_bucket_id': None, 'trackio_static_space_id': None,
    'eval_strategy': 'no', 'eval_steps': None, 'eval_delay': 0, 'per_device_eval_batch_size': 8,
    'prediction_loss_only': False, 'eval_on_start': False, 'eval_do_concat_batches': True,
    'eval_use_gather_object': False, 'eval_accumulation_steps': None, 'include_for_metrics': [],
    'batch_eval_metrics': False, 'save_only_model': False, 'save_strategy': 'steps', 'save_steps': 500,
    'save_on_each_node': False, 'save_total_limit': None, 'enable_jit_checkpoint': False, 'push_to_hub':
    False, 'hub_token': None, 'hub_private_repo': None, 'hub_model_id': None, 'hub_strategy': 'every_save',
    'hub_always_push': False, 'hub_revision': None, 'load_best_model_at_end': False, 'metric_for_best_model':
    None, 'greater_is_better': None, 'ignore_data_skip': False, 'restore_callback_states_from_checkpoint':
    False, 'full_determinism': False, 'seed': 42, 'data_seed': None, 'use_cpu': False, 'accelerator_config':
    None, 'parallelism_config': None, 'dataloader_drop_last': False, 'dataloader_num_workers': 0,
    'dataloader_pin_memory': True, 'dataloader_persistent_workers': False, 'dataloader_prefetch_factor': None,
    'dataloader_multiprocessing_context': None, 'dataloader_in_order': True, 'remove_unused_columns': True,
    'label_names': None, 'train_sampling_strategy': 'random', 'length_column_name': 'length',
    'ddp_find_unused_parameters': None, 'ddp_bucket_cap_mb': None, 'ddp_broadcast_buffers': None,
    'ddp_static_graph': None, 'ddp_backend': None, 'ddp_timeout': 1800, 'fsdp': None, 'fsdp_config': None,
    'deepspeed': None, 'debug': '', 'skip_memory_metrics': True, 'do_train': False, 'do_eval': False,
    'do_predict': False, 'resume_from_checkpoint': None, 'local_rank': -1
}

TRL_CONFIG_DEFAULTS = {
    'SFTConfig': {
        'learning_rate': 2e-05, 'bf16': None, 'gradient_checkpointing': True, 'logging_steps': 10,
        'model_init_kwargs': None, 'trust_remote_code': False, 'router_aux_loss_coef': None,
        'chat_template_path': None, 'dataset_text_field': 'text', 'dataset_kwargs': None, 'dataset_num_proc':
        None, 'eos_token': None, 'max_length': 1024, 'truncation_mode': 'keep_start', 'shuffle_dataset':
        False, 'packing': False, 'packing_strategy': 'bfd', 'padding_free': False, 'pad_to_multiple_of':
        'auto', 'eval_packing': None, 'completion_only_loss': None, 'assistant_only_loss': False, 'loss_type':
        'nll', 'activation_offloading': False, 'pad_token': None
    },
    'DPOConfig': {
        'learning_rate': 1e-06, 'bf16': None, 'gradient_checkpointing': True, 'logging_steps': 10,
        'model_init_kwargs': None, 'trust_remote_code': False, 'router_aux_loss_coef': None,
        'disable_dropout': True, 'dataset_num_proc': None, 'max_length': 1024, 'truncation_mode':
        'keep_start', 'padding_free': False, 'pad_to_multiple_of': 'auto', 'precompute_ref_log_probs': False,
        'precompute_ref_batch_size': None, 'loss_type': ['sigmoid'], 'loss_weights': None, 'ld_alpha': None,
        'f_divergence_type': 'reverse_kl', 'f_alpha_divergence_coef': 0.5, 'label_smoothing': 0.0, 'beta':
        0.1, 'use_weighting': False, 'discopop_tau': 0.05, 'activation_offloading': False, 'sync_ref_model':
        False, 'ref_model_mixup_alpha': 0.6, 'ref_model_sync_steps': 512, 'pad_token': None
    },
    'KTOConfig': {
        'learning_rate': 1e-06, 'bf16': None, 'gradient_checkpointing': True, 'logging_steps': 10,
        'train_sampling_strategy': 'sequential', 'model_init_kwargs': None, 'trust_remote_code': False,
        'router_aux_loss_coef': None, 'disable_dropout': True, 'dataset_num_proc': None, 'max_length': 1024,
        'pad_to_multiple_of': 'auto', 'precompute_ref_log_probs': False, 'precompute_ref_batch_size': None,
        'loss_type': 'kto', 'beta': 0.1, 'desirable_weight': 1.0, 'undesirable_weight': 1.0,
        'activation_offloading': False, 'sync_ref_model': False, 'ref_model_mixup_alpha': 0.6,
        'ref_model_sync_steps': 512
    },
    'RewardConfig': {
        'learning_rate': 0.0001, 'bf16': None, 'gradient_checkpointing': True, 'logging_steps': 10,
        'model_init_kwargs': None, 'trust_remote_code': False, 'chat_template_path': None, 'disable_dropout':
        True, 'dataset_num_proc': None, 'eos_token': None, 'max_length': 1024, 'pad_to_multiple_of': 'auto',
        'center_rewards_coefficient': None, 'activation_offloading': False, 'pad_token': None
    },
    'GRPOConfig': {
        'learning_rate': 1e-06, 'bf16': None, 'gradient_checkpointing': True, 'logging_steps': 10,
        'remove_unused_columns': False, 'model_init_kwargs': None, 'trust_remote_code': False,
        'router_aux_loss_coef': None, 'disable_dropout': False, 'cast_lm_head_to_fp32': False,
        'num_generations': 8, 'num_generations_eval': None, 'max_completion_length': 512,
        'ds3_gather_for_generation': True, 'shuffle_dataset': True, 'pad_to_multiple_of': 'auto',
        'generation_batch_size': None, 'steps_per_generation': None, 'temperature': 1.0, 'top_p': 1.0,
        'top_k': 0, 'min_p': None, 'generation_kwargs': None, 'chat_template_kwargs': None,
        'repetition_penalty': 1.0, 'cache_implementation': None, 'use_vllm': False, 'vllm_mode': 'colocate',
        'vllm_model_impl': 'vllm', 'vllm_enable_sleep_mode': False, 'vllm_structured_outputs_regex': None,
        'vllm_server_base_url': None, 'vllm_server_host': '0.0.0.0', 'vllm_server_port': 8000,
        'vllm_server_timeout': 240.0, 'vllm_group_port': 51216, 'vllm_gpu_memory_utilization': 0.3,
        'vllm_max_model_length': None, 'vllm_tensor_parallel_size': 1, 'beta': 0.0, 'num_iterations': 1,
        'epsilon': 0.2, 'delta': None, 'epsilon_high': None, 'sapo_temperature_neg': 1.05,
        'sapo_temperature_pos': 1.0, 'vespo_k_pos': 2.0, 'vespo_lambda_pos': 3.0, 'vespo_k_neg': 3.0,
        'vespo_lambda_neg': 2.0, 'importance_sampling_level': 'token', 'reward_weights': None,
        'multi_objective_aggregation': 'sum_then_normalize', 'scale_rewards': 'group', 'loss_type': 'dapo',
        'mask_truncated_completions': False, 'sync_ref_model': False, 'ref_model_mixup_alpha': 0.6,
        'ref_model_sync_steps': 512, 'top_entropy_quantile': 1.0, 'entropy_coef': 0.0, 'use_adaptive_entropy':
        False, 'entropy_coef_min': 0.0, 'entropy_coef_max': 1.0, 'entropy_coef_delta': 0.005,
        'entropy_target': 0.2, 'max_tool_calling_iterations': None, 'vllm_importance_sampling_correction':
        True, 'vllm_importance_sampling_mode': 'sequence_mask', 'vllm_importance_sampling_clip_max': 3.0,
        'vllm_importance_sampling_clip_min': None, 'off_policy_mask_threshold': None,
        'use_bias_correction_kl': True, 'log_completions': False, 'log_multimodal': True,
        'num_completions_to_print': None, 'log_unique_prompts': False, 'log_completions_hub_repo': None,
        'use_transformers_continuous_batching': False, 'transformers_continuous_batching_config': None,
        'use_transformers_paged': False, 'vllm_importance_sampling_cap': None
    },
    'CPOConfig': {
        'learning_rate': 1e-06, 'bf16': None, 'gradient_checkpointing': True, 'logging_steps': 10,
        'max_length': 1024, 'max_completion_length': None, 'beta': 0.1, 'label_smoothing': 0.0, 'loss_type':
        'sigmoid', 'disable_dropout': True, 'cpo_alpha': 1.0, 'simpo_gamma': 0.5, 'alpha': 0.0,
        'generate_during_eval': False, 'is_encoder_decoder': None, 'model_init_kwargs': None,
        'trust_remote_code': False, 'dataset_num_proc': None
    },
    'ORPOConfig': {
        'learning_rate': 1e-06, 'bf16': None, 'gradient_checkpointing': True, 'logging_steps': 10,
        'max_length': 1024, 'max_completion_length': None, 'beta': 0.1, 'disable_dropout': True,
        'padding_value': None, 'generate_during_eval': False, 'is_encoder_decoder': None, 'model_init_kwargs':
        None, 'trust_remote_code': False, 'dataset_num_proc': None
    },
    'OnlineDPOConfig': {
        'learning_rate': 5e-07, 'bf16': None, 'gradient_checkpointing': True, 'logging_steps': 10,
        'remove_unused_columns': False, 'reward_model_path': None, 'max_new_tokens': 64, 'max_length': 512,
        'temperature': 0.9, 'top_p': 1.0, 'top_k': 0, 'min_p': None, 'repetition_penalty': 1.0,
        'generation_kwargs': None, 'cache_implementation': None, 'missing_eos_penalty': None, 'beta': [0.1],
        'loss_type': 'sigmoid', 'disable_dropout': True, 'use_vllm': False, 'vllm_model_impl': 'vllm',
        'vllm_structured_outputs_regex': None, 'vllm_gpu_memory_utilization': 0.55, 'vllm_mode': 'colocate',
        'vllm_server_base_url': None, 'vllm_server_host': '0.0.0.0', 'vllm_server_port': 8000,
        'vllm_server_timeout': 240.0, 'vllm_group_port': 51216, 'vllm_tensor_parallel_size': 1,
        'vllm_enable_sleep_mode': False, 'ds3_gather_for_generation': True, 'model_init_kwargs': None,
        'trust_remote_code': False, 'reward_weights': None
    },
}
# fmt: on

# trl 1.12's PPOConfig (OnPolicyConfig + PPOConfig fields), beyond TrainingArguments.
TRL_CONFIG_DEFAULTS["PPOConfig"] = {
    "run_name": None, "dataset_num_proc": None, "num_mini_batches": 1, "total_episodes": None,
    "local_rollout_forward_batch_size": 64, "num_sample_generations": 10, "response_length": 53, "stop_token": None,
    "stop_token_id": None, "temperature": 0.7, "missing_eos_penalty": None, "sft_model_path": "EleutherAI/pythia-160m",
    "world_size": None, "num_total_batches": None, "micro_batch_size": None, "local_batch_size": None,
    "batch_size": None, "local_mini_batch_size": None, "mini_batch_size": None, "push_to_hub": False,
    "exp_name": "ppo_config", "reward_model_path": "EleutherAI/pythia-160m", "model_adapter_name": None,
    "ref_adapter_name": None, "num_ppo_epochs": 4, "whiten_rewards": False, "kl_coef": 0.05, "kl_estimator": "k1",
    "cliprange": 0.2, "vf_coef": 0.1, "cliprange_value": 0.2, "gamma": 1.0, "lam": 0.95,
    "ds3_gather_for_generation": True, "learning_rate": 3e-6, "logging_steps": 10, "bf16": None,
    "gradient_checkpointing": True,
}
# trl 1.13's XPOConfig: OnlineDPOConfig plus alpha.
TRL_CONFIG_DEFAULTS["XPOConfig"] = {**TRL_CONFIG_DEFAULTS["OnlineDPOConfig"], "alpha": [1e-5]}
# trl 1.16's RLOOConfig (generated as the tables above).
# fmt: off
TRL_CONFIG_DEFAULTS["RLOOConfig"] = {
    'learning_rate': 1e-06, 'bf16': None, 'gradient_checkpointing': True, 'logging_steps': 10,
    'remove_unused_columns': False, 'model_init_kwargs': None, 'trust_remote_code': False,
    'router_aux_loss_coef': None, 'disable_dropout': False, 'num_generations': 2,
    'num_generations_eval': None, 'max_completion_length': 512, 'ds3_gather_for_generation': True,
    'shuffle_dataset': True, 'pad_to_multiple_of': 'auto', 'generation_batch_size': None,
    'steps_per_generation': None, 'temperature': 1.0, 'top_p': 1.0, 'top_k': 0, 'min_p': None,
    'generation_kwargs': None, 'chat_template_kwargs': None, 'repetition_penalty': 1.0,
    'cache_implementation': None, 'use_vllm': False, 'vllm_mode': 'colocate', 'vllm_model_impl': 'vllm',
    'vllm_enable_sleep_mode': False, 'vllm_structured_outputs_regex': None, 'vllm_server_base_url': None,
    'vllm_server_host': '0.0.0.0', 'vllm_server_port': 8000, 'vllm_server_timeout': 240.0,
    'vllm_group_port': 51216, 'vllm_gpu_memory_utilization': 0.3, 'vllm_max_model_length': None,
    'vllm_tensor_parallel_size': 1, 'beta': 0.05, 'num_iterations': 1, 'epsilon': 0.2, 'epsilon_high': None,
    'reward_weights': None, 'normalize_advantages': False, 'reward_clip_range': None,
    'mask_truncated_completions': False, 'sync_ref_model': False, 'ref_model_mixup_alpha': 0.6,
    'ref_model_sync_steps': 512, 'log_completions': False, 'log_multimodal': True,
    'num_completions_to_print': None, 'log_unique_prompts': False,
    'use_transformers_continuous_batching': False, 'transformers_continuous_batching_config': None,
    'use_transformers_paged': False
}
# fmt: on

# Older transformers / TRL names that scripts still pass, accepted as the settings they were.
LEGACY_SETTINGS = {"logging_dir": None, "save_safetensors": True, "no_cuda": False, "use_mps_device": False,
                   "dataset_batch_size": None, "half_precision_backend": "auto", "push_to_hub_token": None,
                   "push_to_hub_model_id": None, "push_to_hub_organization": None, "evaluation_strategy": "no",
                   "use_legacy_prediction_loop": False, "model_init_kwargs": None,
                   # mlx-tune's SFTConfig: the LoRA layer count is get_peft_model's; its own trainer switch.
                   "num_layers": None, "use_native_training": None,
                   # transformers 4's switch for train_sampling_strategy="group_by_length"
                   "group_by_length": False}
# Renamed settings: the old name sets the new one.
RENAMED_SETTINGS = {"evaluation_strategy": "eval_strategy",
                    # mlx-tune's (mlx-lm's) names
                    "val_batches": "eval_batches", "steps_per_eval": "eval_steps",
                    "grad_checkpoint": "gradient_checkpointing"}

# trl 1.16's DistillationConfig and trl.experimental.gkd's GKDConfig (SFTConfig plus GKD's fields),
# beyond TrainingArguments.
TRL_CONFIG_DEFAULTS["DistillationConfig"] = {
    "learning_rate": 1e-06, "bf16": None, "gradient_checkpointing": True, "logging_steps": 10,
    "remove_unused_columns": False, "model_init_kwargs": None, "trust_remote_code": False,
    "teacher_model_name_or_path": None, "teacher_model_revision": None, "teacher_model_init_kwargs": None,
    "disable_dropout": False, "max_completion_length": 512, "ds3_gather_for_generation": True,
    "shuffle_dataset": True, "pad_to_multiple_of": "auto", "temperature": 1.0, "top_p": 1.0, "top_k": 0,
    "min_p": None, "generation_kwargs": None, "chat_template_kwargs": None, "repetition_penalty": 1.0,
    "cache_implementation": None, "use_vllm": False, "vllm_mode": "colocate", "vllm_model_impl": "vllm",
    "vllm_enable_sleep_mode": False, "vllm_structured_outputs_regex": None, "vllm_server_base_url": None,
    "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000, "vllm_server_timeout": 240.0, "vllm_group_port": 51216,
    "vllm_gpu_memory_utilization": 0.3, "vllm_max_model_length": None, "vllm_tensor_parallel_size": 1,
    "beta": 1.0, "max_tool_calling_iterations": None, "log_completions": False, "num_completions_to_print": None,
    "log_unique_prompts": False,
}
TRL_CONFIG_DEFAULTS["GKDConfig"] = {
    **TRL_CONFIG_DEFAULTS["SFTConfig"], "temperature": 0.9, "lmbda": 0.5, "beta": 0.5, "max_new_tokens": 128,
    "teacher_model_name_or_path": None, "teacher_model_init_kwargs": None, "disable_dropout": True, "seq_kd": False,
}
