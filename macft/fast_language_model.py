"""Unsloth's ``FastLanguageModel`` entry points and model methods, written once for both backends.

Each backend subclasses ``FastLanguageModelBase`` with its ``Backend``: the handful of model
functions that differ (loading, adding adapters, saving, generation). Everything a user calls,
with its arguments, checks and defaults, lives here.
"""

import sys
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
    generate: Callable | None = None  # HF's model.generate(**inputs, ...) (macft.hf_generate)
    lora_applied: Callable | None = None  # (model, adapter dir or None) -> context with that adapter / none
    # use_gradient_checkpointing="unsloth": checkpointing with the blocks' inputs offloaded to the host
    enable_offloaded_checkpointing: Callable | None = None


class ModelMethods:
    """Methods that Unsloth/PEFT users call on the model itself (they take precedence over the
    model class's own methods of the same name: save_pretrained writes macft's adapter directory)."""

    macft_backend: Backend

    def save_pretrained(self, save_directory, tokenizer=None, **kwargs):
        self.macft_backend.save_adapter(self, save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(save_directory))

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit",
                               dtype: str | None = None, **kwargs):
        """merged_16bit (HF dir, float16 unless ``dtype``), merged_4bit (MLX 4-bit) or lora. Without a
        tokenizer (mlx-tune's call), the one loaded with the model is saved."""
        return self.macft_backend.save_merged(self, tokenizer or _tokenizer_of(self, "save_pretrained_merged"),
                                              save_directory, save_method=save_method, dtype=dtype)

    def save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method: str = "fast_quantized",
                             filename: str | None = None, **kwargs):
        """Merge the adapters and write a GGUF file into ``save_directory`` (named ``filename``, default
        ``<model>-<type>.gguf``); returns its path. Types: f16, bf16, f32, q8_0, q4_0, q4_k_m, q4_k_s,
        q5_k_m, q5_k_s, q6_k, and Unsloth's names (not_quantized, fast_quantized = q8_0, the
        default as in Unsloth, quantized = q4_k_m)."""
        return self.macft_backend.save_gguf(self, tokenizer or _tokenizer_of(self, "save_pretrained_gguf"),
                                            save_directory, quantization_method=quantization_method,
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

    def generate(self, inputs=None, **kwargs):
        """transformers' ``generate``: ``input_ids`` (+ ``attention_mask``, left-padded batches) in, the
        full sequences (prompt + new tokens, pad after EOS) out; greedy unless ``do_sample``; stops at
        every EOS id of the tokenizer and the model; ``streamer`` gets HF's put/put.../end calls.
        Inputs may be torch tensors, numpy arrays, mx arrays or lists. ``seed=`` seeds the sampler.
        Returns a torch LongTensor on the bridge, a numpy int64 array on MLX (see
        ``macft.mlx.generate.hf_generate`` for why not an mx.array)."""
        for name in ("inputs", "input_ids"):
            # transformers 5's apply_chat_template(return_tensors="pt") gives a BatchEncoding, which
            # notebooks written for transformers 4 pass on as the ids themselves.
            given = inputs if name == "inputs" else kwargs.get(name)
            if hasattr(given, "keys") and "input_ids" in given:
                kwargs.pop(name, None)
                inputs = None
                kwargs = {**dict(given), **kwargs}
        return self.macft_backend.generate(self, inputs, **kwargs)

    def fast_generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm: bool = False, **kwargs):
        """Unsloth's vLLM call, run through macft's own generation (there is no vLLM here).

        ``prompts``: a string, a list of strings (tokenized as they are, no chat template, as vLLM
        does), token-id lists, or {"prompt"} / {"prompt_token_ids"} dicts. ``sampling_params``:
        ``macft.hf_generate.SamplingParams``, vLLM's own object or a dict (n, temperature, top_p,
        top_k, min_p, repetition_penalty, max_tokens, seed, stop, stop_token_ids); None = vLLM's
        defaults (temperature 1.0, max_tokens 16). Returns one ``RequestOutput`` per prompt; the
        text is ``result.outputs[0].text``.

        As with Unsloth's vLLM engine, the adapters apply only through ``lora_request``
        (``model.load_lora(dir)``): ``lora_request=None`` generates with the base model.
        """
        from macft import hf_generate as hf

        if kwargs:
            raise ValueError(f"fast_generate: unsupported arguments {sorted(kwargs)} (no vLLM here)")
        tokenizer = _tokenizer_of(self, "fast_generate")
        params = hf.read_sampling_params(sampling_params)
        prompts = hf.read_fast_prompts(prompts, tokenizer)
        eos = _eos_ids(self, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        rows = [ids for _, ids in prompts]
        padded, mask = hf.left_padded(rows, pad)
        generate_kwargs = hf.generate_kwargs_for(params, eos)
        with self.macft_backend.lora_applied(self, _lora_path(lora_request)):
            out = self.generate(input_ids=padded, attention_mask=mask, pad_token_id=pad, **generate_kwargs)
        out = out.tolist()
        width, n = len(padded[0]), params.n
        stop_ids = set(generate_kwargs["eos_token_id"])
        return [hf.RequestOutput(request_id=str(i), prompt=text, prompt_token_ids=ids,
                                 outputs=[hf.completion(j, out[i * n + j][width:], params, stop_ids, tokenizer)
                                          for j in range(n)])
                for i, (text, ids) in enumerate(prompts)]

    def save_lora(self, save_directory):
        """Unsloth's ``save_lora``: the adapter directory (as ``save_pretrained``, without a tokenizer)."""
        return self.macft_backend.save_adapter(self, save_directory)

    def load_lora(self, lora_path, load_tensors: bool = False, **kwargs):
        """A handle for ``fast_generate(..., lora_request=model.load_lora(dir))``: that call runs with the
        directory's adapter weights in the model's adapter layers (same targets and rank as the
        model's get_peft_model), then puts the model's own back. The model itself is unchanged;
        use ``load_adapter`` / ``from_pretrained(dir)`` to keep an adapter."""
        import os

        from macft.hf_generate import LoRARequest

        if not os.path.isdir(lora_path):
            raise FileNotFoundError(f"load_lora: {lora_path} is not an adapter directory")
        ModelMethods._lora_ids += 1
        return LoRARequest(lora_name=os.path.basename(os.path.normpath(str(lora_path))),
                           lora_int_id=ModelMethods._lora_ids, lora_path=str(lora_path))

    _lora_ids = 0

    @property
    def device(self):
        """Where scripts' ``inputs.to(model.device)`` go: an HF model's (cuda_bridge) own device; the
        CPU for MLX models, which take their inputs from host memory."""
        try:
            return super().device
        except AttributeError:
            if "torch" in sys.modules:
                import torch

                return torch.device("cpu")
            return "cpu"

    @property
    def model_name(self) -> str:
        """What from_pretrained was given (mlx-tune's attribute)."""
        return self.macft.name_or_path

    @property
    def lora_config(self) -> dict | None:
        """get_peft_model's settings, None before it (mlx-tune's attribute)."""
        return self.macft.lora_config

    @property
    def lora_enabled(self) -> bool:
        return self.macft.lora_config is not None

    def print_trainable_parameters(self):
        trainable = self.macft_backend.trainable_parameter_count(self)
        total = self.macft_backend.parameter_count(self)
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def _tokenizer_of(model, where: str):
    tokenizer = getattr(getattr(model, "macft", None), "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{where} needs the model's tokenizer: load the model with FastLanguageModel.from_pretrained")
    return tokenizer


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids of the model's generation_config.json, its config and the tokenizer."""
    from macft.hf_generate import eos_ids_of, model_generation_config

    info = model.macft
    return eos_ids_of(model_generation_config(info.path), info.config or {}, tokenizer)


def _lora_path(lora_request):
    """A lora_request's directory: ours / vLLM's LoRARequest (lora_path), or a path."""
    if lora_request is None:
        return None
    path = getattr(lora_request, "lora_path", None) or getattr(lora_request, "lora_local_path", None)
    return str(path if path is not None else lora_request)


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
        from macft.tokenizer_compat import device_tolerant

        tokenizer = device_tolerant(tokenizer)  # notebooks' `tokenizer(...).to("cuda")` on a Mac / CPU
        # generate's EOS ids and fast_generate's prompts need the tokenizer (vLLM holds its own too).
        model.macft.tokenizer = tokenizer
        return cls._with_methods(model), tokenizer

    @classmethod
    def get_peft_model(cls, model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing=True, random_state: int = 3407,
                       use_rslora: bool = False, use_dora: bool = False, num_layers: int | None = None,
                       layers_to_transform=None, max_seq_length=None, loftq_config=None, **kwargs):
        """Add LoRA (or DoRA) adapters; only they train. ``use_gradient_checkpointing``: True
        recomputes each block in the backward; "unsloth" (as in Unsloth) does too and, on the bridge
        with a GPU, keeps each block's input in pinned host memory until its backward (a lower peak,
        the same gradients; cuda_bridge.offload), elsewhere the same as True; False keeps every
        activation. True stays plain recomputation: offloading holds that much pinned host memory
        and moves it over PCIe each step, which is worth it when GPU memory is what limits."""
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
        if use_gradient_checkpointing == "unsloth" and cls.backend.enable_offloaded_checkpointing is not None:
            cls.backend.enable_offloaded_checkpointing(model)
        elif use_gradient_checkpointing:
            cls.backend.enable_gradient_checkpointing(model)
        if max_seq_length:
            model.macft.max_seq_length = max_seq_length
        model.macft.lora_config = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                                   "target_modules": target_modules, "bias": bias, "use_rslora": use_rslora,
                                   "use_dora": use_dora, "use_gradient_checkpointing": use_gradient_checkpointing}
        return cls._with_methods(model)

    @staticmethod
    def convert(hf_path, mlx_path: str = "mlx_model", quantize: bool = False, q_bits: int = 4,
                q_group_size: int = 64, dtype: str = "float32", **kwargs):
        """mlx-tune's ``FastLanguageModel.convert``: an HF model (hub id, directory or .gguf) to an MLX
        directory, quantized when asked (``macft convert``); returns its path."""
        from convert.to_mlx import hf_to_mlx
        from macft.model_files import resolve_model_path

        if kwargs:
            raise TypeError(f"convert: unsupported arguments {', '.join(sorted(kwargs))}")
        return hf_to_mlx(resolve_model_path(hf_path, default_kind="hf"), mlx_path, dtype=dtype, quantize=quantize, q_bits=q_bits,
                         q_group_size=q_group_size)

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
