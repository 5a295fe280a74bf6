"""``FastLanguageModel`` on MLX: Unsloth's entry points (macft.fast_language_model) over the MLX core."""

from macft.fast_language_model import Backend, FastLanguageModelBase
from macft.mlx import model as core


def _save_gguf(model, tokenizer, directory, **kwargs):
    from macft.mlx.adapters import save_gguf

    return save_gguf(model, tokenizer, directory, **kwargs)


def _generate_text(model, tokenizer, prompt, **kwargs):
    from macft.mlx.generate import generate_text

    return generate_text(model, tokenizer, prompt, **kwargs)


def _generate(model, inputs=None, **kwargs):
    from macft.mlx.generate import hf_generate

    return hf_generate(model, inputs, **kwargs)


def _lora_applied(model, adapter_dir):
    from macft.mlx.generate import lora_applied

    return lora_applied(model, adapter_dir)


def _parameter_count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


class FastLanguageModel(FastLanguageModelBase):
    backend = Backend(
        name="MLX", load_pretrained=core.load_pretrained, add_adapters=core.add_adapters,
        enable_gradient_checkpointing=core.enable_gradient_checkpointing, num_layers=lambda model: len(model.layers),
        save_adapter=core.save_adapter, load_adapter=core.load_adapter, save_merged=core.save_merged,
        save_gguf=_save_gguf, generate_text=_generate_text, generate=_generate, lora_applied=_lora_applied,
        trainable_parameter_count=core.trainable_parameter_count, parameter_count=_parameter_count)
