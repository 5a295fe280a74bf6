"""`python -m macft.serve`: the same as `macft serve`."""

from macft.cli import main_for

if __name__ == "__main__":
    main_for("serve")
