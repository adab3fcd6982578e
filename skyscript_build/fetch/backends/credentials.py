"""Earth Engine credentials: a service-account key (file or environment) or none.

A key comes from ``--key-file`` or from ``EE_SERVICE_ACCOUNT_KEY`` (the key's JSON itself, or
the path of a key file). Errors name the file or the variable and what is wrong, never quote
the key's content.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...errors import BackendError

__all__ = ["KEY_ENV", "SCOPES", "load_credentials"]

SCOPES = (
    "https://www.googleapis.com/auth/earthengine",
    "https://www.googleapis.com/auth/cloud-platform",
)
KEY_ENV = "EE_SERVICE_ACCOUNT_KEY"
KEY_FIELDS = ("type", "client_email", "private_key", "token_uri")


def _key_info(text: str, where: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
    except ValueError:
        raise BackendError(f"{where}: not a service-account key (not valid JSON)") from None
    if not isinstance(info, dict):
        raise BackendError(f"{where}: not a service-account key (not a JSON object)")
    missing = [f for f in KEY_FIELDS if not info.get(f)]
    if missing or info.get("type") != "service_account":
        what = f"missing {', '.join(missing)}" if missing else "type is not service_account"
        raise BackendError(f"{where}: not a service-account key ({what})")
    return info


def load_credentials(key_file: str | None) -> tuple[Any, str | None]:
    """Service-account credentials and the key's project from ``key_file`` or the environment.

    Returns (None, None) when neither names a key. Raises ``BackendError`` naming the file (or
    the variable) for a missing or malformed key, never quoting its content.
    """
    env = os.environ.get(KEY_ENV, "").strip()
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise BackendError(f"{path}: service-account key file does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BackendError(
                f"{path}: cannot read the service-account key ({type(e).__name__})"
            ) from None
        info, where = _key_info(text, str(path)), str(path)
    elif env:
        if env.startswith("{"):
            info, where = _key_info(env, KEY_ENV), KEY_ENV
        else:
            return load_credentials(env) if Path(env).is_file() else _bad_env(env)
    else:
        return None, None
    from google.oauth2 import service_account

    try:
        credentials = service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
    except (ValueError, TypeError, IndexError):
        raise BackendError(f"{where}: not a usable service-account key (bad private key)") from None
    return credentials, info.get("project_id")


def _bad_env(value: str) -> tuple[Any, str | None]:
    raise BackendError(f"{KEY_ENV} holds neither a key's JSON nor the path of an existing file")
