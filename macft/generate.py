"""`python -m macft.generate`: the same as `macft generate`."""

from macft.cli import main_for

if __name__ == "__main__":
    main_for("generate")
