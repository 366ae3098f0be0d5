"""``python -m gvsl COMMAND ...``: the ``gvsl`` command."""
from gvsl.commands import main

if __name__ == "__main__":  # not in a spawned worker, which imports this module again
    main()
