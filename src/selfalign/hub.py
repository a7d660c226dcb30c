"""The Hugging Face Hub, where data sets and adapters are published: the token, repo ids, and errors without the token.

The token comes from the environment only and is never printed or stored; every Hub error passes `hub_error`, which
cuts it to one line and masks the token (an HTTP error can quote the request's Authorization header).
"""

from __future__ import annotations

import os

from selfalign.errors import SelfAlignError

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def hub_token(needed_by: str = "--push-to-hub") -> str:
    """The token from HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN); `needed_by` names what asked, for the error."""
    token = next((os.environ[name] for name in TOKEN_VARIABLES if os.environ.get(name)), None)
    if not token:
        raise SelfAlignError(f"{needed_by} needs a Hugging Face token in the HF_TOKEN environment variable")
    return token


def check_repo_id(repo: str) -> str:
    """`repo` if it is a Hub repo id ORG/NAME by the Hub's own rule, else a one-line error before any upload."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo.count("/") != 1:
        raise SelfAlignError(f"repo id '{repo}': expected ORG/NAME, e.g. my-org/gemma-3-270m-selfalign")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "rejected by the Hub's rule"
        raise SelfAlignError(f"repo id '{repo}' is not valid on the Hub: {reason}") from None
    return repo


def hub_error(action: str, exc: BaseException, token: str) -> SelfAlignError:
    """`action failed: first line of the error`, the token masked; network, auth and repo errors arrive as many
    types, so this takes any exception."""
    lines = str(exc).replace(token, "***").strip().splitlines()
    return SelfAlignError(f"{action} failed: {lines[0] if lines else type(exc).__name__}")
