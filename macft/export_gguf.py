"""`macft export-gguf` / `python -m macft.export_gguf`: a model (with an adapter merged in) as GGUF.

    macft export-gguf --model models/smollm2 --adapter-path runs/chat --outfile chat-q8.gguf --outtype q8_0
    macft export-gguf --outfile smollm2-f16.gguf                     # the embedded default model

Written with the `gguf` package (no llama.cpp build): f32, f16, bf16, q8_0 or q4_0, for llama,
mistral, qwen2 and qwen3 models with byte-level BPE tokenizers. The file loads in llama.cpp and in
transformers (``gguf_file=``).
"""

import sys
from pathlib import Path
from typing import Optional

import typer

from macft.convert import fail


def export_gguf_command(
    model: Optional[str] = typer.Option(
        None, "--model", help="Hub id, local HF/MLX dir or .gguf (default: the adapter's base, else SmolLM2-135M)."),
    adapter_path: Optional[str] = typer.Option(None, "--adapter-path", help="Adapter to merge in first."),
    outfile: Optional[str] = typer.Option(None, "--outfile", help="GGUF file to write (default: <model>-<type>.gguf)."),
    outtype: str = typer.Option("f16", "--outtype", help="f16, bf16, f32, q8_0, q4_0, q4_k_m, q4_k_s, q5_k_m, q5_k_s or q6_k."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Write a model, with an optional adapter merged in, as a GGUF file."""
    from convert.gguf_export import OUTTYPES
    from macft.errors import ModelLoadError

    if outtype not in OUTTYPES:
        fail(f"--outtype {outtype!r}: must be one of {', '.join(OUTTYPES)}")
    if adapter_path and not (Path(adapter_path) / "adapter_config.json").is_file():
        fail(f"--adapter-path {adapter_path}: no adapter_config.json (not an adapter directory)")
    try:
        from macft import FastLanguageModel
        from convert.peft_adapters import base_model_of

        base = model or (base_model_of(adapter_path) if adapter_path else None)
        llm, tokenizer = FastLanguageModel.from_pretrained(base, trust_remote_code=trust_remote_code)
        if adapter_path:
            llm.load_adapter(adapter_path)
        target = Path(outfile) if outfile else None
        path = llm.save_pretrained_gguf(str(target.parent) if target else ".", tokenizer, quantization_method=outtype,
                                        filename=target.name if target else None)
    except (ModelLoadError, ValueError, OSError) as err:  # GGUFExportError is a ValueError
        fail(str(err))
    typer.echo(f"Wrote {outtype} GGUF to {path}")


def cli_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(export_gguf_command)
    return app


def main(argv=None):
    cli_app()(args=list(sys.argv[1:] if argv is None else argv), prog_name="python -m macft.export_gguf")


if __name__ == "__main__":
    main()
