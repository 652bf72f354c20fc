"""Quantities in the units people read."""


def size(n: float) -> str:
    """Bytes in the largest binary unit they fill."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"
