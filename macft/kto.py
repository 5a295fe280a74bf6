"""`python -m macft.kto` / `macft kto`: Kahneman-Tversky Optimization from the command line."""

from dataclasses import replace

from macft.cli import BETA, LOSS_TYPE, REFERENCE_MODEL, Flag, main_for
from macft.dpo import MAX_PROMPT_LENGTH, PRECOMPUTE_REF, train_preference

HELP = "Kahneman-Tversky Optimization on prompt / completion / label rows (or preference pairs)."

FLAGS = (
    BETA, replace(LOSS_TYPE, default="kto", help="kto or apo_zero_unpaired."), REFERENCE_MODEL, MAX_PROMPT_LENGTH,
    PRECOMPUTE_REF,
    Flag("desirable_weight", ("--desirable-weight",), float, 1.0, "Weight of the desirable examples' loss."),
    Flag("undesirable_weight", ("--undesirable-weight",), float, 1.0, "Weight of the undesirable examples' loss."),
)

DATA_FORMAT = '{"prompt","completion","label"} or {"prompt","chosen","rejected"}'


def run(values: dict):
    return train_preference(values, "kto", DATA_FORMAT, **kto_fields(values))


def kto_fields(values: dict) -> dict:
    return dict(beta=values["beta"], loss_type=values["loss_type"], desirable_weight=values["desirable_weight"],
                undesirable_weight=values["undesirable_weight"], reference_model_path=values["reference_model_path"],
                precompute_ref_log_probs=values["precompute_ref_log_probs"])


FIELDS = kto_fields


if __name__ == "__main__":
    main_for("kto")
