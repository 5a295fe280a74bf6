"""`python -m macft.cpo` / `macft cpo`: Contrastive Preference Optimization (and SimPO) from the command line."""

from macft.cli import BETA, LOSS_TYPE, Flag, main_for
from macft.dpo import LABEL_SMOOTHING, MAX_PROMPT_LENGTH, train_preference

HELP = "Contrastive Preference Optimization (--loss-type simpo for SimPO) on prompt / chosen / rejected pairs."

FLAGS = (
    BETA, LOSS_TYPE, MAX_PROMPT_LENGTH, LABEL_SMOOTHING,
    Flag("cpo_alpha", ("--cpo-alpha",), float, None, "Weight of the chosen completions' NLL term (default 1.0)."),
    Flag("simpo_gamma", ("--simpo-gamma",), float, None, "SimPO's target reward margin gamma (default 0.5)."),
)


def run(values: dict):
    from macft.data import PREFERENCE_FORMAT

    train_preference(values, "cpo", PREFERENCE_FORMAT, beta=values["beta"], loss_type=values["loss_type"],
                     label_smoothing=values["label_smoothing"], cpo_alpha=values["cpo_alpha"],
                     simpo_gamma=values["simpo_gamma"])


if __name__ == "__main__":
    main_for("cpo")
