"""The one rule for names that become a path component and a model id: adapter and job names in a
run config, the job ids made from them, the names the server answers to. stdlib only.

Every name training can write is one the server can serve: job ids are cut to fit the rule.
"""

from __future__ import annotations

import re

# Short enough that a job id and the publish link's temporary name (`.<name>.<job id>.tmp`) stay
# under the 255-byte limit of a file name.
MAX_LENGTH = 100
RULE = (f"1 to {MAX_LENGTH} characters from ASCII letters, digits, '.', '_' and '-', "
        "the first a letter or a digit")
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LENGTH - 1}}}")


def is_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: object, what: str = "name") -> str:
    """`value` if it follows the rule, else a ValueError that states the rule."""
    if not is_name(value):
        raise ValueError(f"{what} {shown(value)} is not allowed: use {RULE}")
    return value


def job_id(name: str, token: str) -> str:
    """A job's id: its name (cut so that the id follows the rule too), '-', a unique token."""
    return f"{name[:MAX_LENGTH - len(token) - 1]}-{token}"


def shown(value: object, limit: int = 60) -> str:
    """A value as an error message quotes it: repr (escapes control characters and lone
    surrogates), cut to `limit` characters."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)
