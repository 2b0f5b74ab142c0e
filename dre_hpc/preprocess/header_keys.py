"""Values that may come from each tile's FITS header: ``header:KEY`` instead of a number.

Survey tiles carry their own zero point and gain (``MAGZERO``, ``GAIN``...); a run config says
``fit.zero_point: header:MAGZERO`` and every tile's value is read from its image header. A tile
without the key, or with a value that is not a finite number, is an `InputError` naming the key,
the file and the option.
"""

from __future__ import annotations

import math

from ..errors import InputError

PREFIX = "header:"


def header_key(spec):
    """``KEY`` of a ``header:KEY`` setting (upper-cased), or None for anything else."""
    if isinstance(spec, str) and spec.strip().lower().startswith(PREFIX):
        return spec.strip()[len(PREFIX):].strip().upper()
    return None


def header_number(header, key: str, source, option: str) -> float:
    """The finite number of header `key`; an `InputError` naming `key`, `source` and `option`."""
    if key not in header:
        raise InputError(f"{source}: header key {key} is missing ({option}: header:{key}); add it to "
                         f"the header or give {option} a number")
    try:
        value = float(header[key])
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise InputError(f"{source}: header {key} = {header[key]!r} is not a finite number "
                         f"({option}: header:{key})")
    return value


def resolve_value(spec, header, source, option: str):
    """`spec` as a number: None stays None, a number is itself, ``header:KEY`` is read from
    `header` (`header_number`)."""
    key = header_key(spec)
    if key is None:
        return None if spec is None else float(spec)
    return header_number(header, key, source, option)
