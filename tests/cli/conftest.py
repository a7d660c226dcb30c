import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI's root callback installs its own log handler on the root logger; put the old ones back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
