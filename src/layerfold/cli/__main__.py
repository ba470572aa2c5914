"""``python -m layerfold.cli``: the same as the ``layerfold`` command."""

from layerfold.cli import main

main()
