"""``python rank_cli.py COMMAND ARGS...``: a macft command line in one torchrun rank, with one
per-rank change for the tests: MACFT_TEST_RANK_DATA="RANK=PATH" gives rank RANK another --data.

One torchrun command line starts every rank with the same arguments; a run whose ranks disagree
(which ``macft.distributed.World.check_agree`` must catch) needs a rank that reads something else.
"""

import os
import sys


def rank_arguments(argv: list[str], rank: str, override: str | None) -> list[str]:
    """``argv`` with --data replaced on the rank that ``override`` ("RANK=PATH") names."""
    if not override:
        return argv
    wanted, _, path = override.partition("=")
    if wanted != rank:
        return argv
    argv = list(argv)
    argv[argv.index("--data") + 1] = path
    return argv


def main():
    from macft.cli import main as macft_main

    command, *argv = sys.argv[1:]
    argv = rank_arguments(argv, os.environ.get("RANK", "0"), os.environ.get("MACFT_TEST_RANK_DATA"))
    macft_main([command, *argv], prog_name="python -m macft")


if __name__ == "__main__":
    main()
