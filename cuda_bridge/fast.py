"""``FastLanguageModel`` on the bridge: Unsloth's entry points (macft.fast_language_model) over
transformers models."""

from cuda_bridge import model as core
from macft.fast_language_model import Backend, FastLanguageModelBase


def _save_gguf(model, tokenizer, directory, **kwargs):
    from cuda_bridge.lora import save_gguf

    return save_gguf(model, tokenizer, directory, **kwargs)


def _generate_text(model, tokenizer, prompt, **kwargs):
    from cuda_bridge.generate import generate_text

    return generate_text(model, tokenizer, prompt, **kwargs)


def _generate(model, inputs=None, **kwargs):
    from cuda_bridge.generate import hf_generate

    return hf_generate(model, inputs, **kwargs)


def _enable_offloaded_checkpointing(model):
    # On a CPU model this is plain checkpointing (lora.enable_gradient_checkpointing says why).
    return core.enable_gradient_checkpointing(model, offload=True)


def _lora_applied(model, adapter_dir):
    from cuda_bridge.generate import lora_applied

    return lora_applied(model, adapter_dir)


class FastLanguageModel(FastLanguageModelBase):
    backend = Backend(
        name="the bridge", load_pretrained=core.load_pretrained, add_adapters=core.add_adapters,
        enable_gradient_checkpointing=core.enable_gradient_checkpointing,
        num_layers=lambda model: len(core.decoder_layers(model)), save_adapter=core.save_adapter,
        load_adapter=core.load_adapter, save_merged=core.save_merged, save_gguf=_save_gguf,
        generate_text=_generate_text, generate=_generate, lora_applied=_lora_applied,
        trainable_parameter_count=core.trainable_parameter_count,
        parameter_count=lambda model: sum(p.numel() for p in model.parameters()),
        enable_offloaded_checkpointing=_enable_offloaded_checkpointing)
