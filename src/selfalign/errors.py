"""Errors meant for the user: the CLI prints their message on one line and exits non-zero, without a traceback."""


class SelfAlignError(Exception):
    """A problem with the user's input or environment, explained in one line."""
