"""`python -m macft.xpo` / `macft xpo`: Exploratory Preference Optimization with a judge.

    python -m macft.xpo --model M --data prompts.jsonl --reward-fn my_reward.py --alpha 1e-5

The flags are Online DPO's (`macft.online_dpo`) plus --alpha.
"""

from macft.cli import Flag, main_for
from macft.online_dpo import ONLINE_FLAGS, train_online

HELP = ("XPO: Online DPO where one answer comes from the model and one from the reference, plus an "
        "exploration bonus (--alpha).")

FLAGS = (*ONLINE_FLAGS, Flag("alpha", ("--alpha",), float, 1e-5,
                             "Weight of the exploration term: alpha * log-prob of the reference's answer."))


def run(values: dict):
    return train_online(values, "xpo")


if __name__ == "__main__":
    main_for("xpo")
