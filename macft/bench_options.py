"""What the ``macft bench`` commands share: the random-model options and the backend switch."""

import os

import typer

MODEL_SHAPE_OPTION = typer.Option(None, "--model-shape",
                                  help="Instead of --model, a random-init model of this shape: llama-3.2-1b, llama-3.1-8b or tiny.")
TOKENIZER_OPTION = typer.Option(None, "--tokenizer", help="With --model-shape: a directory whose tokenizer to use "
                                                           "(default: the embedded SmolLM2's).")


def use_backend(backend: str | None):
    """Make ``--backend`` this process's backend (the choice is cached per process)."""
    if backend:
        from macft.backend import current

        os.environ["MACFT_BACKEND"] = backend
        current.cache_clear()


def peer_optimizer() -> str:
    """The ``optim`` whose update rule the peers on this backend use, so that the loss curves
    compare step by step: mlx-lm-lora's MLX AdamW (no bias correction) on mlx, torch's AdamW
    (HF + PEFT, Unsloth) on cuda."""
    from macft.backend import current

    return "adamw" if current() == "mlx" else "adamw_torch_fused"
