"""``FastLanguageModel`` on MLX: Unsloth's entry points over the MLX core."""

import warnings

from macft.mlx import model as core
from macft.mlx.generate import generate_text


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name=None, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False, full_finetuning: bool = False, trust_remote_code: bool = False,
                        token=None, device_map=None, **kwargs):
        """Load (model, tokenizer) from a hub id, a local HF/MLX directory, a .gguf file, or an adapter dir.

        ``model_name=None`` loads the embedded default (SmolLM2-135M-Instruct).
        """
        _warn_ignored(kwargs, "from_pretrained")
        model, tokenizer = core.load_pretrained(model_name, max_seq_length=max_seq_length, dtype=dtype,
                                                load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                                                full_finetuning=full_finetuning,
                                                trust_remote_code=trust_remote_code)
        _attach_methods(model)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing=True, random_state: int = 3407,
                       use_rslora: bool = False, use_dora: bool = False, num_layers: int | None = None,
                       layers_to_transform=None, max_seq_length=None, loftq_config=None, **kwargs):
        """Add LoRA (or DoRA) adapters; only they train. ``use_gradient_checkpointing`` may be
        True, False or "unsloth" (same as True here)."""
        _warn_ignored(kwargs, "get_peft_model")
        if bias != "none":
            raise ValueError(f"bias={bias!r}: only bias='none' is supported")
        if loftq_config:
            raise ValueError("loftq_config is not supported")
        if layers_to_transform is not None:
            layers = sorted(layers_to_transform)
            n = len(model.layers)
            if layers != list(range(n - len(layers), n)):
                raise ValueError("layers_to_transform must be the last N layers (mlx-lm adapters); use num_layers")
            num_layers = len(layers)
        core.add_adapters(model, r=r, target_modules=target_modules, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=use_dora,
                          num_layers=num_layers, random_state=random_state)
        if use_gradient_checkpointing:
            core.enable_gradient_checkpointing(model)
        if max_seq_length:
            model.macft.max_seq_length = max_seq_length
        return model

    @staticmethod
    def for_inference(model):
        model.eval()
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        model.train()
        return model


class _ModelMethods:
    """Methods that Unsloth/PEFT users call on the model itself."""

    def save_pretrained(self, save_directory, tokenizer=None, **kwargs):
        core.save_adapter(self, save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)

    def save_pretrained_merged(self, save_directory, tokenizer, save_method: str = "merged_16bit", **kwargs):
        return core.save_merged(self, tokenizer, save_directory, save_method=save_method)

    def load_adapter(self, adapter_directory, **kwargs):
        return core.load_adapter(self, adapter_directory)

    def generate_text(self, tokenizer, prompt: str, **kwargs) -> str:
        return generate_text(self, tokenizer, prompt, **kwargs)

    def print_trainable_parameters(self):
        trainable = core.trainable_parameter_count(self)
        from mlx.utils import tree_flatten

        total = sum(v.size for _, v in tree_flatten(self.parameters()))
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


_WITH_METHODS = {}


def _attach_methods(model):
    """Give this model instance the methods above, keeping it the mlx-lm model it is."""
    cls = type(model)
    if not issubclass(cls, _ModelMethods):
        if cls not in _WITH_METHODS:
            _WITH_METHODS[cls] = type(cls.__name__, (cls, _ModelMethods), {})
        model.__class__ = _WITH_METHODS[cls]
    return model


def _warn_ignored(kwargs, where):
    if kwargs:
        warnings.warn(f"{where}: ignoring options not used on MLX: {', '.join(sorted(kwargs))}", stacklevel=3)
