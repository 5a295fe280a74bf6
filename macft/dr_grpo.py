"""`python -m macft.dr_grpo` / `macft dr_grpo`: Dr. GRPO (arXiv:2503.20783), the GRPO command with `--preset dr_grpo`.

Same flags as `macft grpo`; a flag given overrides the preset's value (`algorithms.grpo.PRESETS`).
"""

from macft.cli import main_for
from macft.grpo import GROUP_FLAGS, train_group_algorithm

HELP = "Dr. GRPO: GRPO without std normalisation, loss over a constant max_completion_length."

FLAGS = GROUP_FLAGS


def run(values: dict):
    return train_group_algorithm(values, "dr_grpo")


if __name__ == "__main__":
    main_for("dr_grpo")
