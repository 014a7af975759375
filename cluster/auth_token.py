"""The Ray cluster token. raywatch keeps Ray 2.60's token authentication on (RAY_AUTH_MODE=token).

A head cannot start without a token, and a machine where Ray never ran has none, so whatever starts a
head (`raywatch up`, the demo, the test cluster, the benchmarks) first makes sure one exists where Ray
looks for it, in Ray's order: the RAY_AUTH_TOKEN variable, the file named by RAY_AUTH_TOKEN_PATH,
then ~/.ray/auth_token. A missing one is created with Ray's own generator, readable by its owner
alone. Joining a cluster never creates one: the cluster's token has to come from its operator.
The token itself is never printed or logged; only where it is.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    """Ray's default place for the token: ~/.ray/auth_token (the same function Ray's CLI uses)."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    return _get_default_token_path()


def token_file() -> Path:
    """The file Ray reads the token from when RAY_AUTH_TOKEN is not set."""
    explicit = os.environ.get(TOKEN_PATH_ENV)
    return Path(explicit).expanduser() if explicit else default_token_path()


def find_token() -> str | None:
    """Where Ray will find the cluster token, in words; None when it will find none."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return f"the {TOKEN_ENV} variable"
    path = token_file()
    if path.is_file() and path.read_text().strip():
        return str(path)
    return None


def ensure_token() -> tuple[str, bool]:
    """For a head raywatch starts: (where the token is, whether it was created just now)."""
    found = find_token()
    if found:
        return found, False
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path = token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # created owner-only in one step, so the secret is never readable by others, not even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())
    return str(path), True


def require_token(address: str) -> str:
    """For joining the cluster at `address`: where its token is, or an error that says where to put it."""
    found = find_token()
    if found:
        return found
    raise RuntimeError(
        f"joining the Ray cluster at {address} needs its token (token authentication is on), and none was found. "
        f"Copy the cluster's token into {default_token_path()} (chmod 600), or point {TOKEN_PATH_ENV} at a file "
        f"holding it, or set {TOKEN_ENV}; the cluster's operator gets it with `ray get-auth-token` on the head."
    )
