"""`python -m macft.dapo` / `macft dapo`: DAPO (arXiv:2503.14476), the GRPO command with `--preset dapo`.

Same flags as `macft grpo`; a flag given overrides the preset's value (`algorithms.grpo.PRESETS`).
"""

from macft.cli import main_for
from macft.grpo import GROUP_FLAGS, train_group_algorithm

HELP = "DAPO: clip-higher, token-level loss, dynamic sampling, truncated completions masked."

FLAGS = GROUP_FLAGS


def run(values: dict):
    return train_group_algorithm(values, "dapo")


if __name__ == "__main__":
    main_for("dapo")
