"""Weight paging; it lives in `lcmkit.io.paging` (the lowest layer) and is re-exported here."""

from lcmkit.io.paging import (  # noqa: F401
    release_weight_pages,
    resident_weight_bytes,
    weight_ranges,
)

__all__ = ["release_weight_pages", "resident_weight_bytes", "weight_ranges"]
