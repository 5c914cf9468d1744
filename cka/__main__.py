"""``python -m cka``: the command line, as the ``cka`` script runs it."""

from cka.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
