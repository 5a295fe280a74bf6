"""`macft fuse` / `python -m macft.fuse`: fold an adapter into its base model, with mlx_lm.fuse's flags.

    macft fuse --adapter-path runs/chat --save-path fused            # base from the adapter's config
    macft fuse --model models/q4 --adapter-path runs/chat --save-path fused --dequantize
    macft fuse --adapter-path runs/chat --save-path fused --export-gguf --gguf-path chat-f16.gguf
    macft fuse --adapter-path runs/chat --save-path fused --push-to-hub me/chat-fused

A float base gives an HF directory (float16 unless --dtype) that transformers, mlx_lm and macft
load. A quantized base stays quantized as mlx_lm.fuse keeps it (adapted layers quantized again,
others untouched) unless --dequantize. The adapter may be macft's, mlx-lm's or PEFT's.
"""

import sys
from pathlib import Path
from typing import Optional

import typer

from macft.convert import fail


def fuse_command(
    model: Optional[str] = typer.Option(
        None, "--model", help="Base model (default: the adapter's base_model_name_or_path / model key)."),
    save_path: str = typer.Option("fused_model", "--save-path", help="Where to write the fused model."),
    adapter_path: str = typer.Option("adapters", "--adapter-path", help="Adapter directory (macft, mlx-lm or PEFT)."),
    upload_repo: Optional[str] = typer.Option(None, "--push-to-hub", "--upload-repo",
                                              help="Upload the fused model to this Hugging Face repo (user/name)."),
    dequantize: bool = typer.Option(False, "-d", "--dequantize", help="Write float weights even for a quantized base."),
    export_gguf: bool = typer.Option(False, "--export-gguf", help="Also write an f16 GGUF file."),
    gguf_path: str = typer.Option("ggml-model-f16.gguf", "--gguf-path",
                                  help="GGUF file name, relative to --save-path."),
    dtype: str = typer.Option("float16", "--dtype", help="Float type of the fused weights: float16, bfloat16, float32."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Fuse an adapter into its base model (and optionally export GGUF / upload)."""
    from convert.merge import DTYPES
    from macft.errors import ModelLoadError
    from macft.hub import HubError

    adapter = Path(adapter_path)
    if not (adapter / "adapter_config.json").is_file():
        fail(f"--adapter-path {adapter}: no adapter_config.json (not an adapter directory)")
    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    try:
        from macft import FastLanguageModel
        from convert.peft_adapters import base_model_of

        base = model or base_model_of(adapter)
        llm, tokenizer = FastLanguageModel.from_pretrained(base, trust_remote_code=trust_remote_code)
        llm.load_adapter(str(adapter))
        quantized = "quantization" in llm.macft.config
        if quantized and not dequantize:
            from macft.mlx.adapters import save_fused_quantized  # MLX's packed layers

            save_fused_quantized(llm, tokenizer, save_path)
            typer.echo(f"Wrote fused model (quantized like its base) to {save_path}")
        else:
            llm.save_pretrained_merged(save_path, tokenizer, save_method="merged_16bit", dtype=dtype)
            typer.echo(f"Wrote fused {dtype} model to {save_path}")
        if export_gguf:
            path = llm.save_pretrained_gguf(save_path, tokenizer, quantization_method="f16", filename=gguf_path)
            typer.echo(f"Wrote {path}")
        if upload_repo:
            from macft.hub import model_card, push_folder

            card = model_card(upload_repo, base_model=base, run_dir=adapter, kind="fused model")
            url = push_folder(save_path, upload_repo, card=card, commit_message="Upload fused model (macft fuse)")
            typer.echo(f"Uploaded to {url}")
    except (ModelLoadError, HubError, ValueError, OSError) as err:
        fail(str(err))


def cli_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(fuse_command)
    return app


def main(argv=None):
    cli_app()(args=list(sys.argv[1:] if argv is None else argv), prog_name="python -m macft.fuse")


if __name__ == "__main__":
    main()
