"""`python -m reapsurgery`: the same CLI as the `reapsurgery` command (torchrun runs modules this way)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="reapsurgery")
