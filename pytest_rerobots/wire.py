"""What the API's values look like: its ids, its timestamps and its error strings, read
one way everywhere.

Pure functions near the bottom of the package (they import nothing of ours but the
errors), used by the client and its add-on endpoints, the renting code, the listing and
the kept-instance store.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .errors import MalformedResponse

__all__ = ["check_id", "epoch", "error_message", "is_uuid"]


def is_uuid(value: Any) -> bool:
    """Whether ``value`` is a UUID in its canonical text form, as the API gives every id
    (instances, deployments, reservations). Anything else (``"../new/basic_kobuki"``) must
    never reach a URL path; a target that is not one is a workspace type."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def check_id(value: Any, what: str) -> str:
    """``value`` if it is a valid id, else ``MalformedResponse`` naming ``what`` it was."""
    if not is_uuid(value):
        raise MalformedResponse(f"{what}: {str(value)[:80]!r} is not an instance id (a UUID)")
    return str(value)


def error_message(payload: Any) -> str:
    """The error string of an API answer, whichever key the endpoint uses."""
    if isinstance(payload, Mapping):
        for key in ("error_message", "error", "result_message", "message"):
            value = payload.get(key)
            if isinstance(value, str):
                return value
    if isinstance(payload, str):
        return payload
    return ""


def epoch(stamp: Any) -> float:
    """Seconds since the epoch of an API timestamp, ``isoformat()+'Z'`` or ``str(datetime)``
    (naive UTC); ``-inf`` when it cannot be read, so an unreadable stamp never passes a
    lower bound."""
    if not isinstance(stamp, str) or not stamp:
        return float("-inf")
    text = stamp.strip().removesuffix("Z").replace("T", " ")
    # Python 3.10's fromisoformat takes only 3 or 6 digits of fraction.
    text = re.sub(r"\.(\d{1,6})\d*$", lambda m: "." + m.group(1).ljust(6, "0"), text)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return float("-inf")
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()
