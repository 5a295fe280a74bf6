"""Load models on the bridge: transformers models with cuda_bridge's kernels patched in.

The public model layer of cuda_bridge, with the MLX core's names (``macft.mlx.model``):
``load_pretrained``, ``add_adapters``, ``enable_gradient_checkpointing``, ``save_adapter``,
``load_adapter``, ``save_merged``, ``trainable_parameter_count``, plus ``sequence_logps`` /
``hidden_states`` (cuda_bridge.logps). Models are ``AutoModelForCausalLM`` instances; what a
loaded model is, where it came from and how it is adapted is kept on ``model.macft``
(``macft.model_files.ModelInfo``), exactly as on MLX.

Sources: None (the embedded default), a hub id (offline cache), an HF directory, a .gguf file,
an adapter directory (its base, then the adapter), and MLX directories written by
``macft convert`` / mlx-lm, float or quantized. A quantized MLX directory keeps its packed 4/8-bit
weights: each quantized linear becomes a ``QuantizedLinear`` and a quantized embedding a
``QuantizedEmbedding`` (MLX's affine format, read as is), so one converted directory serves both
machines. ``load_in_4bit`` / ``load_in_8bit`` quantize at load with mlx-lm's rule (every linear
and embedding layer whose input dim divides into groups, the untied head included), so both
backends compute with the same weights.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from cuda_bridge.lora import (add_adapters, decoder_layers, enable_gradient_checkpointing,
                              float_state_dict, load_adapter, save_adapter, save_merged,
                              trainable_parameter_count)
from cuda_bridge.logps import hidden_states, lm_head_weight, sequence_logps
from macft.errors import ModelLoadError
from macft.model_files import (ModelInfo, PeftSettings, adapter_base, is_adapter_dir,
                               resolve_model_path, settings_dict)

__all__ = ["load_pretrained", "add_adapters", "enable_gradient_checkpointing", "save_adapter", "load_adapter",
           "save_merged", "save_full_model", "trainable_parameter_count", "sequence_logps", "hidden_states",
           "lm_head_weight", "quantize_model", "decoder_layers", "float_state_dict", "settings_dict", "ModelInfo",
           "PeftSettings", "default_device", "default_dtype"]

# Keys of an MLX config.json that only describe its packing (transformers must not see them).
_MLX_QUANTIZATION_KEYS = ("quantization", "quantization_config")


def default_device() -> torch.device:
    """The GPU (under torchrun, this rank's: ``cuda:LOCAL_RANK``, made current), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from cuda_bridge.distributed import launch_device

    return launch_device() or torch.device("cuda")


def default_dtype(device) -> torch.dtype:
    """bfloat16 on a GPU, float32 on the CPU (the MLX core computes in float32 there too)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def use_one_blas_thread_on_cpu():
    """On the CPU, in a process not running MLX, give the OpenBLAS that ``import macft`` loaded one
    thread: it serves torch's BLAS calls too, and its threads and torch's contend (macft.openblas)."""
    if not torch.cuda.is_available() and "mlx.core" not in sys.modules:
        from macft.openblas import set_openblas_threads

        set_openblas_threads(1)


def parse_dtype(dtype):
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    name = getattr(dtype, "__name__", None) or str(dtype).replace("torch.", "").replace("mlx.core.", "")
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise ModelLoadError(f"dtype {dtype!r}: expected float32, float16 or bfloat16")
    return table[name]


def load_pretrained(model_name=None, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False,
                    load_in_8bit: bool = False, full_finetuning: bool = False, trust_remote_code: bool = False,
                    quantization_group_size: int = 64, device=None):
    """Load (model, tokenizer). An adapter directory loads its base, then the adapter."""
    from transformers import AutoTokenizer

    if load_in_4bit and load_in_8bit:
        raise ModelLoadError("load_in_4bit and load_in_8bit are exclusive: pick one")
    use_one_blas_thread_on_cpu()
    path = resolve_model_path(model_name, default_kind="hf")  # the float HF dir: no mlx needed
    if is_adapter_dir(path):
        model, tokenizer = load_pretrained(adapter_base(path), max_seq_length, dtype, load_in_4bit, load_in_8bit,
                                           trust_remote_code=trust_remote_code,
                                           quantization_group_size=quantization_group_size, device=device)
        load_adapter(model, path)
        return model, tokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    config = json.loads((path / "config.json").read_text())
    if _is_mlx_quantized(config):
        model = _load_mlx_quantized(path, config, dtype, trust_remote_code)
    else:
        model = _load_float(path, dtype, trust_remote_code)
    model.to(device)
    bits = 4 if load_in_4bit else 8 if load_in_8bit else None
    if bits and not _is_mlx_quantized(config):
        quantize_model(model, group_size=quantization_group_size, bits=bits)
        config = {**config, "quantization": {"group_size": quantization_group_size, "bits": bits, "mode": "affine"}}
    from cuda_bridge.patching import patch_model

    patch_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.macft = ModelInfo(name_or_path=str(model_name) if model_name else str(path), path=str(path),
                            config=config, max_seq_length=max_seq_length, load_bits=bits)
    for p in model.parameters():
        p.requires_grad_(full_finetuning)
    if full_finetuning:
        if any(_is_quantized(m) for m in model.modules()):
            raise ModelLoadError(f"{path}: full fine-tuning needs float weights; this model is quantized "
                                 "(use LoRA, or load the float model)")
        model.macft.peft = PeftSettings(fine_tune_type="full")
    return model, tokenizer


def _load_float(path: Path, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: {e}") from None


def _is_mlx_quantized(config: dict) -> bool:
    q = config.get("quantization")
    return isinstance(q, dict) and "bits" in q and "group_size" in q


def _is_quantized(module) -> bool:
    return hasattr(module, "dequantized_weight") and hasattr(module, "group_size")


# ----------------------------------------------------------------------------- MLX quantized directories


def _load_mlx_quantized(path: Path, config: dict, dtype, trust_remote_code: bool):
    """Build the transformers model with empty weights, swap in quantized layers where the files
    hold ``scales``, and load every tensor as stored (packed words kept, floats cast to ``dtype``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from cuda_bridge.kernels.quant_matmul import QuantizedEmbedding, QuantizedLinear

    quantization = config["quantization"]
    hf_config_dict = {k: v for k, v in config.items() if k not in _MLX_QUANTIZATION_KEYS}
    try:
        hf_config = AutoConfig.for_model(**hf_config_dict)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None
    weights = _read_safetensors(path)
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers computed
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)

    quantized = {name.removesuffix(".scales") for name in weights if name.endswith(".scales")}
    for name in sorted(quantized):
        params = quantization.get(name) if isinstance(quantization.get(name), dict) else quantization
        if params.get("mode", "affine") != "affine":
            raise ModelLoadError(f"{path}: layer {name} uses quantization mode {params['mode']!r}; "
                                 "the bridge reads MLX affine quantization only")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"{path}: quantized tensor {name}.scales has no layer {name} in the model") from None
        # An empty (meta) quantized layer of the stored shape; load_state_dict below assigns the
        # file's tensors to it as they are (no copy; uint32 words are viewed as int32).
        packed = weights[f"{name}.weight"]
        bits, group_size = params["bits"], params["group_size"]
        rows, cols = packed.shape[0], packed.shape[-1] * 32 // bits
        try:
            if isinstance(module, nn.Embedding):
                new = QuantizedEmbedding(rows, cols, group_size=group_size, bits=bits, dtype=dtype, device="meta")
                new = _keep_embedding_scale(module, new)
            elif isinstance(module, nn.Linear):
                new = QuantizedLinear(cols, rows, bias=f"{name}.bias" in weights, group_size=group_size, bits=bits,
                                      dtype=dtype, device="meta")
            else:
                raise ModelLoadError(f"{path}: {name} is a {type(module).__name__}; only linear and embedding "
                                     "layers can be quantized")
        except ValueError as e:
            raise ModelLoadError(f"{path}: layer {name}: {e}") from None
        _set_submodule(model, name, new)

    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    expected = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()
                                                           if not _non_persistent(model, k)}
    unexpected = sorted(k for k in weights if k not in expected)
    if unexpected:
        raise ModelLoadError(f"{path}: tensors the model has no place for: {', '.join(unexpected[:8])}")
    try:
        model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:  # shapes that do not fit the config (or the quantization parameters)
        raise ModelLoadError(f"{path}: {e}") from None
    _tie_head(model)
    left = [k for k, v in list(model.named_parameters()) + list(model.named_buffers()) if v.is_meta]
    if left:
        raise ModelLoadError(f"{path}: the weight files lack {', '.join(left[:8])}")
    model.eval()
    return model


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    weights = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def _non_persistent(model, buffer_name: str) -> bool:
    module_name, _, leaf = buffer_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf in module._non_persistent_buffers_set


def _set_submodule(model, name: str, module):
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def _embedding_scale(embedding):
    """Gemma scales its embeddings by sqrt(hidden) inside the embedding module; keep that factor."""
    scale = getattr(embedding, "scalar_embed_scale", None)
    if scale is None:
        scale = getattr(embedding, "embed_scale", None)
    if scale is None or (torch.is_tensor(scale) and scale.is_meta):
        return None
    return float(scale)


def _keep_embedding_scale(old, new):
    scale = _embedding_scale(old)
    if scale is not None and scale != 1.0:
        new.__class__ = _scaled_embedding_class(type(new))
        new.embed_scale = scale
    return new


_SCALED = {}


def _scaled_embedding_class(cls):
    if cls not in _SCALED:
        def forward(self, ids):
            rows = cls.forward(self, ids)
            # HF: embedding(ids) * embed_scale.to(weight dtype)
            return rows * torch.tensor(self.embed_scale, dtype=rows.dtype, device=rows.device)

        _SCALED[cls] = type(f"Scaled{cls.__name__}", (cls,), {"forward": forward})
    return _SCALED[cls]


class TiedQuantizedHead(nn.Module):
    """The output head of a model whose head is its (quantized) embedding: logits = h @ E^T.

    Holds the embedding without registering it, so its tensors are saved once, under the embedding.
    """

    _macft_tied_head = True

    def __init__(self, embedding):
        super().__init__()
        self._embedding = [embedding]

    @property
    def embedding(self):
        return self._embedding[0]

    def forward(self, hidden):
        return self.embedding.as_linear(hidden)


def _tie_head(model):
    """Point the output head at the input embedding where the config ties them."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return
    if _is_quantized(embedding):
        model.set_output_embeddings(TiedQuantizedHead(embedding))
    else:
        head.weight = embedding.weight


# ----------------------------------------------------------------------------- quantize at load


def quantize_model(model, group_size: int = 64, bits: int = 4):
    """MLX affine quantization of every linear and embedding layer whose input dim is a multiple of
    ``group_size`` (mlx-lm's ``quantize_model`` rule): the same layers and the same packed values as
    ``macft.mlx.model.load_pretrained(..., load_in_4bit=True)``. A tied head follows the embedding."""
    from cuda_bridge.kernels.quant_matmul import QuantizedEmbedding, QuantizedLinear

    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    for name, module in list(model.named_modules()):
        if tied and module is head:
            continue
        if isinstance(module, nn.Embedding) and module.embedding_dim % group_size == 0:
            new = _keep_embedding_scale(module, QuantizedEmbedding.from_embedding(module, group_size, bits))
        elif isinstance(module, nn.Linear) and module.in_features % group_size == 0:
            new = QuantizedLinear.from_linear(module, group_size, bits)
        else:
            continue
        _set_submodule(model, name, new)
    if tied and head is not None and isinstance(embedding, nn.Embedding):
        if _is_quantized(model.get_input_embeddings()):
            model.set_output_embeddings(TiedQuantizedHead(model.get_input_embeddings()))
    return model


# ----------------------------------------------------------------------------- full models


def save_full_model(model, directory, state_dict: dict | None = None):
    """Write the whole (fully fine-tuned) model as a model directory that transformers, mlx_lm and
    both macft backends load: safetensors under the shared names, config.json, tokenizer files.
    ``state_dict``: the weights to write instead of ``model.state_dict()`` (a sharded model's,
    gathered whole beforehand)."""
    from safetensors.torch import save_file

    from convert.files import copy_side_files, write_weight_shards
    from cuda_bridge.kernels.quant_matmul import to_uint32

    info: ModelInfo = model.macft
    directory = Path(directory)
    weights = {}
    for name, value in (model.state_dict() if state_dict is None else state_dict).items():
        if value.dtype == torch.int32 and name.endswith(".weight"):
            value = to_uint32(value)  # MLX's packed words
        weights[name] = value.detach().cpu().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        for name, module in model.named_modules():
            if module is model.get_output_embeddings():
                weights.pop(f"{name}.weight", None)
    write_weight_shards(weights, directory, lambda tensors, p: save_file(tensors, p, metadata={"format": "pt"}))
    copy_side_files(info.path, directory)
    (directory / "config.json").write_text(json.dumps(info.config, indent=2))
