"""`python -m macft.cpo` / `macft cpo`: Contrastive Preference Optimization (and SimPO) from the command line."""

from macft.cli import BETA, Flag, main_for
from macft.dpo import LABEL_SMOOTHING, MAX_PROMPT_LENGTH, PREFERENCE_LOSS_TYPE, train_preference

HELP = "Contrastive Preference Optimization (--loss-type simpo for SimPO) on prompt / chosen / rejected pairs."

FLAGS = (
    BETA, PREFERENCE_LOSS_TYPE, MAX_PROMPT_LENGTH, LABEL_SMOOTHING,
    Flag("cpo_alpha", ("--cpo-alpha",), float, 1.0, "Weight of the chosen completions' NLL term (default 1.0)."),
    Flag("simpo_gamma", ("--simpo-gamma",), float, 0.5, "SimPO's target reward margin gamma (default 0.5)."),
)


def run(values: dict):
    from macft.data import PREFERENCE_FORMAT

    return train_preference(values, "cpo", PREFERENCE_FORMAT, **cpo_fields(values))


def cpo_fields(values: dict) -> dict:
    return dict(beta=values["beta"], loss_type=values["loss_type"], label_smoothing=values["label_smoothing"],
                cpo_alpha=values["cpo_alpha"], simpo_gamma=values["simpo_gamma"])


FIELDS = cpo_fields


if __name__ == "__main__":
    main_for("cpo")
