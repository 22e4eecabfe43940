"""Docker's credential helpers (`credHelpers`, `credsStore` in ~/.docker/config.json), as
docker, skopeo and oras use them: `docker-credential-NAME get`, the registry host on
stdin, `{"Username": ..., "Secret": ...}` on stdout.

A helper that says it has nothing (non-zero exit), is missing, or hangs gives no
credentials, with a warning for the last two: the registry then says whether it needs
any, in its own words. Its output is a secret: never logged.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 30.0
# What docker accepts as a helper name: it becomes part of a program name on PATH.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A helper's username for an identity (OAuth refresh) token rather than a password.
IDENTITY_TOKEN = "<token>"


def helper_for(config: dict, host: str) -> str | None:
    """The helper docker would ask for `host`: its own entry, else the default store."""
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict) and isinstance(helpers.get(host), str):
        return helpers[host]
    store = config.get("credsStore")
    return store if isinstance(store, str) and store else None


def get(name: str, host: str) -> tuple[str, str] | None:
    """(username, secret) from `docker-credential-NAME`, or None."""
    if not _NAME.match(name):
        log.warning("ignoring credential helper %r: not a helper name", name)
        return None
    program = f"docker-credential-{name}"
    try:
        done = subprocess.run([program, "get"], input=host, capture_output=True, text=True,
                              timeout=HELPER_TIMEOUT)
    except FileNotFoundError:
        log.warning("credential helper %s (docker config) is not installed: no credentials "
                    "for %s from it", program, host)
        return None
    except subprocess.TimeoutExpired:
        log.warning("credential helper %s did not answer within %gs", program, HELPER_TIMEOUT)
        return None
    if done.returncode != 0:
        # "credentials not found in native keychain": nothing stored for this host.
        return None
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        log.warning("credential helper %s answered something that is not JSON", program)
        return None
    user, secret = (answer.get("Username"), answer.get("Secret")) if isinstance(
        answer, dict) else (None, None)
    if not isinstance(user, str) or not isinstance(secret, str) or not user or not secret:
        return None
    if user == IDENTITY_TOKEN:
        log.warning("credential helper %s holds an identity token for %s, which galleryfs "
                    "cannot use: log in with a password or robot secret instead", program, host)
        return None
    return user, secret
