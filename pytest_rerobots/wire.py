"""What the API's values look like: its ids and its timestamps, read one way everywhere.

Pure functions at the bottom of the package (they import nothing of ours), used by the
client, the renting code, the listing and the kept-instance store.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any

__all__ = ["epoch", "is_uuid"]


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
