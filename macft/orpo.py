"""`python -m macft.orpo` / `macft orpo`: Odds Ratio Preference Optimization from the command line."""

from macft.cli import BETA, main_for
from macft.dpo import MAX_PROMPT_LENGTH, train_preference

HELP = "Odds Ratio Preference Optimization (SFT and preference in one loss, no reference model)."

FLAGS = (BETA, MAX_PROMPT_LENGTH)


def run(values: dict):
    from macft.data import PREFERENCE_FORMAT

    return train_preference(values, "orpo", PREFERENCE_FORMAT, **orpo_fields(values))


def orpo_fields(values: dict) -> dict:
    return dict(beta=values["beta"])


FIELDS = orpo_fields


if __name__ == "__main__":
    main_for("orpo")
