"""Unsloth's ``FastLanguageModel`` entry points and model methods, written once for both backends.

Each backend subclasses ``FastLanguageModelBase`` with its ``Backend``: the handful of model
functions that differ (loading, adding adapters, saving, generation). Everything a user calls,
with its arguments, checks and defaults, lives here.
"""

import warnings
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Backend:
    name: str  # in messages: "MLX", "the bridge"
    load_pretrained: Callable
    add_adapters: Callable
    enable_gradient_checkpointing: Callable
    num_layers: Callable  # model -> number of decoder blocks
    save_adapter: Callable
    load_adapter: Callable
    save_merged: Callable
    save_gguf: Callable
    generate_text: Callable
    trainable_parameter_count: Callable
    parameter_count: Callable


class ModelMethods:
    """Methods that Unsloth/PEFT users call on the model itself (they take precedence over the
    model class's own methods of the same name: save_pretrained writes macft's adapter directory)."""

    macft_backend: Backend

    def save_pretrained(self, save_directory, tokenizer=None, **kwargs):
        self.macft_backend.save_adapter(self, save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(save_directory))

    def save_pretrained_merged(self, save_directory, tokenizer, save_method: str = "merged_16bit",
                               dtype: str | None = None, **kwargs):
        """merged_16bit (HF dir, float16 unless ``dtype``), merged_4bit (MLX 4-bit) or lora."""
        return self.macft_backend.save_merged(self, tokenizer, save_directory, save_method=save_method, dtype=dtype)

    def save_pretrained_gguf(self, save_directory, tokenizer, quantization_method: str = "f16",
                             filename: str | None = None, **kwargs):
        """Merge the adapters and write a GGUF file (f16, bf16, f32, q8_0 or q4_0) into ``save_directory``
        (named ``filename``, default ``<model>-<type>.gguf``); returns its path."""
        return self.macft_backend.save_gguf(self, tokenizer, save_directory, quantization_method=quantization_method,
                                            filename=filename)

    def push_to_hub(self, repo_id, tokenizer=None, token=None, private: bool = False, **kwargs):
        """Upload the adapter (with a model card) to the Hugging Face Hub; returns the commit URL."""
        from macft.hub import push_model

        return push_model(self, repo_id, tokenizer=tokenizer, token=token, private=private, save_method="lora",
                          run_dir=kwargs.get("run_dir"))

    def push_to_hub_merged(self, repo_id, tokenizer, save_method: str = "merged_16bit", token=None,
                           private: bool = False, **kwargs):
        """Upload the merged model (``save_pretrained_merged``'s ``save_method``) to the Hub."""
        from macft.hub import push_model

        return push_model(self, repo_id, tokenizer=tokenizer, token=token, private=private, save_method=save_method,
                          run_dir=kwargs.get("run_dir"))

    def load_adapter(self, adapter_directory, **kwargs):
        return self.macft_backend.load_adapter(self, adapter_directory)

    def generate_text(self, tokenizer, prompt: str, **kwargs) -> str:
        return self.macft_backend.generate_text(self, tokenizer, prompt, **kwargs)

    def print_trainable_parameters(self):
        trainable = self.macft_backend.trainable_parameter_count(self)
        total = self.macft_backend.parameter_count(self)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


class FastLanguageModelBase:
    backend: Backend

    @classmethod
    def from_pretrained(cls, model_name=None, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False, full_finetuning: bool = False, trust_remote_code: bool = False,
                        token=None, device_map=None, **kwargs):
        """Load (model, tokenizer) from a hub id, a local HF/MLX directory, a .gguf file, or an adapter dir.

        ``model_name=None`` loads the embedded default (SmolLM2-135M-Instruct).
        """
        cls._warn_ignored(kwargs, "from_pretrained")
        model, tokenizer = cls.backend.load_pretrained(model_name, max_seq_length=max_seq_length, dtype=dtype,
                                                       load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                                                       full_finetuning=full_finetuning,
                                                       trust_remote_code=trust_remote_code)
        return cls._with_methods(model), tokenizer

    @classmethod
    def get_peft_model(cls, model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing=True, random_state: int = 3407,
                       use_rslora: bool = False, use_dora: bool = False, num_layers: int | None = None,
                       layers_to_transform=None, max_seq_length=None, loftq_config=None, **kwargs):
        """Add LoRA (or DoRA) adapters; only they train. ``use_gradient_checkpointing`` may be
        True, False or "unsloth" (same as True here)."""
        cls._warn_ignored(kwargs, "get_peft_model")
        if bias != "none":
            raise ValueError(f"bias={bias!r}: only bias='none' is supported")
        if loftq_config:
            raise ValueError("loftq_config is not supported")
        if layers_to_transform is not None:
            layers = sorted(layers_to_transform)
            n = cls.backend.num_layers(model)
            if layers != list(range(n - len(layers), n)):
                raise ValueError("layers_to_transform must be the last N layers (mlx-lm adapters); use num_layers")
            num_layers = len(layers)
        cls.backend.add_adapters(model, r=r, target_modules=target_modules, lora_alpha=lora_alpha,
                                 lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=use_dora,
                                 num_layers=num_layers, random_state=random_state)
        if use_gradient_checkpointing:
            cls.backend.enable_gradient_checkpointing(model)
        if max_seq_length:
            model.macft.max_seq_length = max_seq_length
        return cls._with_methods(model)

    @staticmethod
    def for_inference(model):
        model.eval()
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        model.train()
        return model

    _classes_with_methods: dict = {}

    @classmethod
    def _with_methods(cls, model):
        """Give this model instance the ModelMethods, keeping it the model class it is."""
        model_class = type(model)
        if not issubclass(model_class, ModelMethods):
            key = (model_class, cls.backend.name)
            if key not in cls._classes_with_methods:
                cls._classes_with_methods[key] = type(model_class.__name__, (ModelMethods, model_class),
                                                      {"__module__": model_class.__module__,
                                                       "macft_backend": cls.backend})
            model.__class__ = cls._classes_with_methods[key]
        return model

    @classmethod
    def _warn_ignored(cls, kwargs, where):
        if kwargs:
            warnings.warn(f"{where}: ignoring options not used on {cls.backend.name}: {', '.join(sorted(kwargs))}",
                          stacklevel=3)
