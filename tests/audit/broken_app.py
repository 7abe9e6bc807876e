"""A module ``--app`` can name that fails while importing (the CLI reports it in one line)."""

raise RuntimeError("this module cannot be imported")
