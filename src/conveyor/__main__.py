"""``python -m conveyor``: the same as the ``conveyor`` command."""

# First, before click and the user's module are imported: a signal while the command
# starts stops it cleanly (see _early_stop).
from conveyor._early_stop import install

install()

from conveyor.cli import main  # noqa: E402 - after the handlers, on purpose

if __name__ == "__main__":
    main()
