"""`python -m macft <command>`: the same as `macft <command>`."""

from macft.cli import main

if __name__ == "__main__":
    main()
