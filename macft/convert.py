"""`macft convert` / `python -m macft.convert`: HF (or .gguf) -> MLX, with mlx_lm.convert's flags.

    macft convert --hf-path Qwen/Qwen3-0.6B --mlx-path qwen3-4bit -q
    macft convert --hf-path model.gguf --mlx-path model-mlx          # GGUF -> HF -> MLX
    macft convert --hf-path qwen3-4bit --mlx-path qwen3-hf -d        # dequantized export
    macft convert --mlx-path smollm2-4bit -q                         # the embedded default model

With -d the output is an HF directory (dequantized safetensors, config.json without
`quantization`) which mlx_lm also loads as an unquantized MLX model.
"""

import re
import sys
from pathlib import Path
from typing import Optional

import typer

DTYPES = ("float32", "float16", "bfloat16")
QUANT_RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")  # mlx_lm.convert's recipes
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def fail(message: str):
    """One line on stderr, exit status 2: the errors a user can fix need no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def convert_command(
    hf_path: Optional[str] = typer.Option(
        None, "--hf-path", "--model",
        help="Hub id, local HF directory, .gguf file, or MLX directory (with -d). "
             "Default: the embedded SmolLM2-135M-Instruct."),
    mlx_path: str = typer.Option("mlx_model", "--mlx-path", help="Where to write the converted model (must not exist)."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize with MLX affine group quantization."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Group size for quantization (32, 64 or 128)."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight for quantization (2, 3, 4, 5, 6 or 8)."),
    quant_predicate: Optional[str] = typer.Option(
        None, "--quant-predicate", help=f"Mixed-bit recipe: {', '.join(QUANT_RECIPES)}."),
    dtype: str = typer.Option("float32", "--dtype", help=f"Type of the float parameters: {', '.join(DTYPES)}."),
    dequantize: bool = typer.Option(False, "-d", "--dequantize",
                                    help="Dequantize an MLX model into an HF directory."),
):
    """Convert a Hugging Face model (or .gguf) to MLX, optionally quantized; or dequantize (-d)."""
    if quantize and dequantize:
        fail("choose either -q/--quantize or -d/--dequantize, not both")
    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    if quant_predicate is not None and quant_predicate not in QUANT_RECIPES:
        fail(f"--quant-predicate {quant_predicate!r}: must be one of {', '.join(QUANT_RECIPES)}")
    if quant_predicate is not None and not quantize:
        fail("--quant-predicate needs -q/--quantize")
    output = Path(mlx_path)
    if output.exists():
        fail(f"--mlx-path {output}: already exists; delete it or choose another path")
    source = resolve_source(hf_path)

    try:
        if dequantize:
            if not source.is_dir():
                fail(f"--hf-path {source}: -d/--dequantize needs an MLX model directory")
            from convert.to_hf import mlx_to_hf

            mlx_to_hf(source, output, dtype=dtype)
            typer.echo(f"Wrote dequantized HF model to {output}")
        else:
            from convert.to_mlx import hf_to_mlx

            hf_to_mlx(source, output, dtype=dtype, quantize=quantize, q_bits=q_bits,
                      q_group_size=q_group_size, quant_predicate=quant_predicate)
            what = f"{q_bits}-bit (group {q_group_size})" if quantize else dtype
            typer.echo(f"Wrote {what} MLX model to {output}")
    except (ValueError, OSError) as err:  # GGUFImportError is a ValueError
        fail(str(err))


def resolve_source(hf_path: Optional[str]) -> Path:
    """The local directory or .gguf file to read, downloading a hub id when it is not a path."""
    if hf_path is None:
        from macft.default_model import DefaultModelMissing, default_model_dir

        try:
            return default_model_dir("hf")
        except DefaultModelMissing as err:
            fail(str(err))
    path = Path(hf_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            fail(f"--hf-path {path}: a file must be a .gguf; otherwise give a model directory")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            fail(f"--hf-path {path}: not a model directory (no config.json)")
        return path
    if _HUB_ID.match(hf_path):
        return download(hf_path)
    fail(f"--hf-path {hf_path}: no such file or directory")


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # The files mlx_lm itself fetches for a conversion.
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model",
            "*.txt", "*.jsonl", "*.jinja"]))
    except Exception as err:  # offline, unknown repo, gated repo: all one message
        fail(f"--hf-path {repo_id}: no such local path, and the Hugging Face Hub download failed "
             f"({type(err).__name__})")


def cli_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(convert_command)
    return app


def main(argv=None):
    cli_app()(args=list(sys.argv[1:] if argv is None else argv), prog_name="python -m macft.convert")


if __name__ == "__main__":
    main()
