"""HF <-> MLX conversion, MLX 4/8-bit quantization, GGUF import.

    convert.gguf_to_hf(gguf_path, hf_path)                  # GGUF -> float32 HF dir (numpy only)
    convert.hf_to_mlx(hf_path, mlx_path, dtype="float32",   # HF dir or .gguf -> MLX dir
                      quantize=False, q_bits=4, q_group_size=64)
    convert.mlx_to_hf(mlx_path, hf_path, dtype="float32")   # MLX (quantized or not) -> HF dir
    convert.gguf_to_mlx(gguf_path, mlx_path)                # GGUF -> quantized MLX, Q4_0/Q4_1/Q8_0
                                                            # blocks repacked losslessly (group 32)
    convert.export_gguf(weights, config, tokenizer, outfile, outtype="f16")  # HF-named arrays -> GGUF
    convert.hf_dir_to_gguf(hf_dir, outfile, outtype="q8_0") # float HF dir -> GGUF (f16/q8_0/q4_0...)
    convert.read_adapter(adapter_dir)                       # PEFT / mlx-lm adapter -> common numpy form
    convert.merge_into(state_dict, adapter)                 # fold an adapter into HF-named weights
    convert.write_hf_model(weights, config, out_dir, tokenizer, dtype="float16")  # merged HF dir

Submodules load on first use, so `import convert` needs neither mlx nor torch. (No submodule
is named after a function: importing `convert.hf_to_mlx` would rebind `convert.hf_to_mlx`.)
"""

import importlib

_FUNCTIONS = {
    "gguf_to_hf": "convert.gguf_import",
    "hf_to_mlx": "convert.to_mlx",
    "mlx_to_hf": "convert.to_hf",
    "gguf_to_mlx": "convert.gguf_mlx",
    "GGUFImportError": "convert.gguf_import",
    "export_gguf": "convert.gguf_export",
    "hf_dir_to_gguf": "convert.gguf_export",
    "GGUFExportError": "convert.gguf_export",
    "read_adapter": "convert.peft_adapters",
    "merge_into": "convert.peft_adapters",
    "AdapterFormatError": "convert.peft_adapters",
    "write_hf_model": "convert.merge",
}

__all__ = list(_FUNCTIONS)


def __getattr__(name):
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_FUNCTIONS))
