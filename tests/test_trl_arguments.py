"""A TRL / Unsloth script runs with only its import swapped: every TRL 1.16 and transformers
TrainingArguments setting is accepted (TRL's defaults where macft has the field), trainer
arguments TRL takes are understood, and train() returns transformers' TrainOutput."""

import dataclasses
import importlib
import json
import math
import warnings

import pytest

import macft.config as configs
from macft.config import ConfigWarning
from macft.run_dir import learning_rate_at
from macft.trl_settings import TRAINING_ARGUMENTS_DEFAULTS, TRL_CONFIG_DEFAULTS

# macft config -> the TRL 1.16 config it stands for (module, class).
TRL_CONFIGS = {
    "SFTConfig": ("trl", "SFTConfig"), "DPOConfig": ("trl", "DPOConfig"), "KTOConfig": ("trl", "KTOConfig"),
    "RewardConfig": ("trl", "RewardConfig"), "GRPOConfig": ("trl", "GRPOConfig"),
    "CPOConfig": ("trl.experimental.cpo", "CPOConfig"), "ORPOConfig": ("trl.experimental.orpo", "ORPOConfig"),
    "OnlineDPOConfig": ("trl.experimental.online_dpo", "OnlineDPOConfig"),
    "DistillationConfig": ("trl", "DistillationConfig"), "GKDConfig": ("trl.experimental.gkd", "GKDConfig"),
}
TRL_CONFIGS["RLOOConfig"] = ("trl", "RLOOConfig")

# Shared fields whose default differs from TRL's on purpose, and why.
INTENDED_DIFFERENCES = {
    "output_dir": "TRL's None becomes 'trainer_output' (or '<model>-SFT'); macft writes runs/latest",
    "assistant_only_loss": "macft trains on assistant tokens by default (DESIGN section 5); set False for TRL's "
                           "whole-conversation loss",
    "bf16": "not a macft field (the model's dtype decides)",
    "train_sampling_strategy": "KTOConfig: TRL's 'sequential' keeps its precomputed KL completions aligned; macft's KTO "
                               "pairs them within each batch, so it shuffles ('random') as the other preference "
                               "trainers do ('sequential' given is honoured)",
}


def default_of(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def same_meaning(ours, theirs) -> bool:
    """Equal, or a one-item list that means its item (TRL 1.16's loss_type=['sigmoid'], beta=[0.1])."""
    if isinstance(theirs, list) and len(theirs) == 1 and not isinstance(ours, list):
        theirs = theirs[0]
    theirs = getattr(theirs, "value", theirs)
    return ours == theirs or (isinstance(ours, float) and isinstance(theirs, float) and math.isclose(ours, theirs))


def trl_class(name):
    pytest.importorskip("trl")
    module, cls = TRL_CONFIGS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), cls)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", sorted(TRL_CONFIGS))
def test_shared_fields_take_trl_defaults(name):
    ours = {f.name: default_of(f) for f in dataclasses.fields(getattr(configs, name))}
    theirs = {f.name: default_of(f) for f in dataclasses.fields(trl_class(name))}
    differ = {key: (ours[key], theirs[key]) for key in sorted(set(ours) & set(theirs))
              if key not in INTENDED_DIFFERENCES and not same_meaning(ours[key], theirs[key])}
    assert differ == {}


def test_training_config_takes_training_arguments_defaults():
    transformers = pytest.importorskip("transformers")
    theirs = {f.name: default_of(f) for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = {f.name: default_of(f) for f in dataclasses.fields(configs.TrainingConfig)}
    # TRL's configs all log every 10 steps and checkpoint the model's activations by default.
    trl_overrides = {"logging_steps": 10, "gradient_checkpointing": True}
    differ = {key: (ours[key], theirs[key]) for key in sorted(set(ours) & set(theirs))
              if key not in INTENDED_DIFFERENCES and not same_meaning(ours[key], trl_overrides.get(key, theirs[key]))}
    assert differ == {}


def test_learning_rates_are_trl_defaults():
    expected = {"SFTConfig": 2e-5, "DPOConfig": 1e-6, "CPOConfig": 1e-6, "ORPOConfig": 1e-6, "KTOConfig": 1e-6,
                "GRPOConfig": 1e-6, "RewardConfig": 1e-4, "OnlineDPOConfig": 5e-7, "XPOConfig": 5e-7,
                "PPOConfig": 3e-6, "RLOOConfig": 1e-6}
    assert {name: getattr(configs, name)().learning_rate for name in expected} == expected
    config = configs.SFTConfig()
    assert (config.seed, config.num_train_epochs, config.per_device_train_batch_size, config.logging_steps,
            config.max_length) == (42, 3.0, 8, 10, 1024)
    grpo = configs.GRPOConfig()
    assert (grpo.num_generations, grpo.max_completion_length, grpo.temperature, grpo.epsilon, grpo.beta,
            grpo.loss_type) == (8, 512, 1.0, 0.2, 0.0, "dapo")


def test_settings_tables_match_the_installed_packages():
    transformers = pytest.importorskip("transformers")
    theirs = {f.name: getattr(default_of(f), "value", default_of(f))
              for f in dataclasses.fields(transformers.TrainingArguments)}
    theirs = {k: (None if v is dataclasses.MISSING else v) for k, v in theirs.items()}
    assert TRAINING_ARGUMENTS_DEFAULTS == theirs
    for name in TRL_CONFIGS:
        fields = {f.name: getattr(default_of(f), "value", default_of(f)) for f in dataclasses.fields(trl_class(name))}
        expected = {k: v for k, v in fields.items() if k not in theirs or v != theirs[k]}
        assert TRL_CONFIG_DEFAULTS[name] == expected, name


@pytest.mark.parametrize("name", sorted(TRL_CONFIGS))
def test_every_trl_setting_is_accepted_quietly_at_its_default(name):
    cls = getattr(configs, name)
    theirs = {f.name: default_of(f) for f in dataclasses.fields(trl_class(name)) if f.init}
    own = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in theirs.items() if k not in own and v is not dataclasses.MISSING}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        config = cls(**values)
    for key, value in values.items():
        assert getattr(config, key) == value


def test_a_setting_macft_cannot_apply_warns_once_naming_it():
    with pytest.warns(ConfigWarning) as caught:
        config = configs.SFTConfig(push_to_hub=True, neftune_noise_alpha=5.0, dataset_num_proc=4, bf16=True)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "push_to_hub=True" in message and "neftune_noise_alpha=5.0" in message
    assert "dataset_num_proc" not in message and "bf16" not in message  # quietly accepted
    assert config.push_to_hub is True and config.dataset_num_proc == 4
    assert config.hub_model_id is None  # an unset setting reads as TRL's default
    assert config.to_dict()["push_to_hub"] is True  # run.json records it


def test_use_vllm_and_optim_names_warn_and_run_on_macft():
    with pytest.warns(ConfigWarning, match="use_vllm=True: generation runs on macft's own engine"):
        configs.GRPOConfig(use_vllm=True, vllm_mode="server", vllm_gpu_memory_utilization=0.5)
    with pytest.warns(ConfigWarning, match="optim='paged_adamw_8bit' runs as AdamW"):
        config = configs.SFTConfig(optim="paged_adamw_8bit")
    assert config.optim == "paged_adamw_8bit"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        configs.SFTConfig(optim="adamw_torch", report_to="none", lr_scheduler_type="cosine_with_restarts",
                          save_strategy="epoch", eval_strategy="steps", evaluation_strategy="steps")


def test_unknown_setting_is_a_type_error_and_old_names_carry_over():
    with pytest.raises(TypeError, match="'learnin_rate'"):
        configs.SFTConfig(learnin_rate=1e-4)
    assert configs.SFTConfig(max_seq_length=77).max_length == 77
    assert configs.SFTConfig(evaluation_strategy="epoch").eval_strategy == "epoch"
    assert configs.OnlineDPOConfig(beta=[0.3]).beta == 0.3


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule, options", [
    ("linear", {}), ("cosine", {}), ("cosine_with_restarts", {"num_cycles": 3}), ("polynomial", {"power": 2.0}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("constant_with_warmup", {}), ("inverse_sqrt", {}),
])
def test_schedules_follow_transformers_after_warmup(schedule, options):
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    peak, total, warmup = 1e-3, 40, 5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=options)
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [learning_rate_at(step, peak=peak, total_steps=total, warmup_steps=warmup, schedule=schedule,
                             options=options) for step in range(total)]
    # Warmup differs on purpose by one step (macft's first step already trains: lr = peak/warmup).
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-6, abs=1e-12)


# ----------------------------------------------------------------------------- trainers on both backends

ROWS = [{"prompt": f"Say the code word {i}.", "completion": f" The code word is banana {i % 3}."} for i in range(8)]
QA_ROWS = [{"question": f"Say the code word {i}.", "answer": f"banana {i % 3}"} for i in range(8)]


@pytest.fixture(params=["mlx", "cuda"])
def backend(request, monkeypatch):
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
        return importlib.import_module("macft.mlx")
    pytest.importorskip("torch")
    monkeypatch.setenv("MACFT_BACKEND", "cuda")
    monkeypatch.setenv("MACFT_KERNELS", "reference")
    return importlib.import_module("cuda_bridge")


def lora_config(**values):
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(**values)


def test_sft_from_a_path_with_peft_config_returns_train_output(backend, tiny_model_dir, tmp_path, capsys):
    from transformers.trainer_utils import TrainOutput

    args = configs.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-3, disable_tqdm=True, logging_steps=1, max_seq_length=64)
    peft_config = lora_config(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = backend.SFTTrainer(model=str(tiny_model_dir("llama")), args=args, train_dataset=ROWS,
                                 peft_config=peft_config)
    peft = trainer.model.macft.peft
    assert (peft.fine_tune_type, peft.r, peft.lora_alpha, sorted(peft.target_modules)) == ("lora", 4, 8.0,
                                                                                           ["q_proj", "v_proj"])
    row = trainer.train_dataset[0]
    assert set(row) == {"input_ids", "attention_mask", "labels"} and len(trainer.train_dataset) == len(ROWS)
    example = trainer.train_dataset.examples[0]
    assert row["labels"] == [t if m else -100 for t, m in zip(example.input_ids, example.loss_mask)]
    assert row["labels"][0] == -100 and any(label != -100 for label in row["labels"])

    output = trainer.train()
    assert isinstance(output, TrainOutput) and output.global_step == 3
    assert set(output.metrics) == {"train_runtime", "train_samples_per_second", "train_steps_per_second",
                                   "total_flos", "train_loss", "epoch"}
    losses = [r["loss"] for r in trainer.metrics_history if "loss" in r and "eval_loss" not in r]
    assert len(losses) == 3 and output.training_loss == pytest.approx(sum(losses) / 3)
    assert output.metrics["train_loss"] == output.training_loss
    assert output.metrics["train_steps_per_second"] == pytest.approx(3 / output.metrics["train_runtime"], rel=0.05)
    assert trainer.state.global_step == 3 and trainer.state.log_history[-1]["train_loss"] == output.training_loss
    printed = capsys.readouterr().out
    assert "SFTTrainer: lr 0.001 linear" in printed and "batch 2 x 1 accumulation" in printed
    assert "LoRA r=4 alpha=8" in printed
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert (settings["learning_rate"], settings["total_steps"], settings["seed"]) == (1e-3, 3, 42)


def test_sft_full_fine_tune_from_a_path_without_peft_config(backend, tiny_model_dir, tmp_path):
    args = configs.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                             disable_tqdm=True, max_length=64)
    trainer = backend.SFTTrainer(model=str(tiny_model_dir("llama")), args=args, train_dataset=ROWS)
    assert trainer.model.macft.peft.fine_tune_type == "full"


def test_formatting_func_text_field_and_edited_masks(backend, tiny_model_dir, tmp_path):
    model, tokenizer = backend.FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), max_seq_length=64)
    model = backend.FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj"])

    def make(**kwargs):
        args = configs.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                                 disable_tqdm=True, overwrite_output_dir=True, **kwargs.pop("config", {}))
        return backend.SFTTrainer(model=model, processing_class=tokenizer, args=args, **kwargs)

    formatted = make(train_dataset=QA_ROWS, formatting_func=lambda row: f"Q: {row['question']}\nA: {row['answer']}")
    expected = tokenizer.encode("Q: Say the code word 0.\nA: banana 0", add_special_tokens=False)
    assert formatted.train_dataset[0]["input_ids"][:len(expected)] == expected or \
        formatted.train_dataset[0]["input_ids"][1:len(expected) + 1] == expected  # after a BOS token

    texts = [{"body": f"Q: Say the code word {i}.\nA: banana {i % 3}", "text": "unused"} for i in range(8)]
    by_field = make(train_dataset=texts, config={"dataset_text_field": "body"})
    assert by_field.train_dataset[0]["input_ids"] == formatted.train_dataset[0]["input_ids"]

    # Unsloth's train_on_responses_only edits the masks before train(): what trains follows them.
    for example in by_field.train_dataset.examples:
        example.loss_mask[:] = [0] * (len(example.loss_mask) - 1) + [1]
    by_field.train()
    assert by_field.metrics_history[0]["tokens"] > 0
    assert all(sum(row["labels"][i] != -100 for i in range(len(row["labels"]))) == 1 for row in by_field.train_dataset)


def test_trainer_arguments_from_older_trl_and_unused_ones(backend, tiny_model_dir, tmp_path):
    model, tokenizer = backend.FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), max_seq_length=64)
    model = backend.FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj"])
    rows = [{"prompt": "Hi", "chosen": " yes", "rejected": " no"}] * 2
    args = configs.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, disable_tqdm=True)
    with pytest.warns(UserWarning, match="DPOTrainer ignores callbacks, compute_metrics"):
        trainer = backend.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=rows,
                                     processing_class=tokenizer, beta=0.25, max_length=48, callbacks=[object()],
                                     compute_metrics=lambda p: {})
    assert (trainer.args.beta, trainer.args.max_length) == (0.25, 48)
    with pytest.raises(TypeError, match="ref_model must be None"):
        backend.DPOTrainer(model=model, ref_model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_setting'"):
        backend.DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, not_a_setting=1)
    sft = backend.SFTTrainer(model, configs.SFTConfig(output_dir=str(tmp_path / "sft"), disable_tqdm=True), None,
                             ROWS, None, tokenizer)  # TRL's positional order
    assert sft.tokenizer is tokenizer and len(sft.train_dataset) == len(ROWS)
    sft = backend.SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=ROWS, max_seq_length=32,
                             dataset_text_field="text", packing=False, dataset_num_proc=2,
                             args=configs.SFTConfig(output_dir=str(tmp_path / "sft2")))
    assert sft.args.max_length == 32


def test_a_transformers_model_object_is_a_clear_type_error(tmp_path):
    with pytest.raises(TypeError, match="FastLanguageModel.from_pretrained"):
        importlib.import_module("macft.mlx").SFTTrainer(model=object(), processing_class=object(),
                                                        args=configs.SFTConfig(output_dir=str(tmp_path)),
                                                        train_dataset=ROWS)


def test_patch_dpo_trainer_is_public():
    import macft

    assert macft.PatchDPOTrainer() is None and "PatchDPOTrainer" in dir(macft)
