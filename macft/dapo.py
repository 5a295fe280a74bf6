"""`python -m macft.dapo` / `macft dapo`: DAPO (arXiv:2503.14476), the GRPO command with `--preset dapo`.

Same flags as `macft grpo`; a flag given overrides the preset's value (`algorithms.grpo.PRESETS`).

The paper's settings (arXiv:2503.14476): clip-higher (0.2, 0.28), token-level loss, no KL,
dynamic sampling, overlong filtering (truncated completions masked); 512 prompts per rollout and
mini-batches of 32 prompts, 16 gradient updates per rollout. Here `--steps-per-generation` defaults
to 4 x `--gradient-accumulation-steps` (`macft.config.GENERATION_STEPS` says why not 16), so the
last three steps of each generation train on older rollouts and clip-higher acts; give
16 x accumulation for the paper's ratio.
"""

from macft.cli import main_for
from macft.grpo import GROUP_FLAGS, train_group_algorithm

HELP = "DAPO: clip-higher, token-level loss, dynamic sampling, truncated completions masked."

FLAGS = GROUP_FLAGS


def run(values: dict):
    return train_group_algorithm(values, "dapo")


if __name__ == "__main__":
    main_for("dapo")
