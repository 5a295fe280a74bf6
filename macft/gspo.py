"""`python -m macft.gspo` / `macft gspo`: GSPO (arXiv:2507.18071), the GRPO command with `--preset gspo`.

Same flags as `macft grpo`; a flag given overrides the preset's value (`algorithms.grpo.PRESETS`).

The paper's settings (arXiv:2507.18071 §5.1): sequence-level ratio, clip range (3e-4, 4e-4), no KL,
and each rollout batch split into four minibatches for gradient updates: here
`--steps-per-generation` = 4 x `--gradient-accumulation-steps` (`macft.config.GENERATION_STEPS`),
so the last three steps of each generation train on older rollouts and the clip acts.
"""

from macft.cli import main_for
from macft.grpo import GROUP_FLAGS, train_group_algorithm

HELP = "GSPO: GRPO with a sequence-level importance ratio and a tight clip (epsilon 3e-4 / 4e-4), no KL."

FLAGS = GROUP_FLAGS


def run(values: dict):
    return train_group_algorithm(values, "gspo")


if __name__ == "__main__":
    main_for("gspo")
