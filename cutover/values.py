"""Values shared by the decoder, the codec and the mapping engine.

:data:`UNCHANGED` marks a column whose value PostgreSQL did not send because it is an unchanged
TOAST value (pgoutput tuple kind ``u``). It is not NULL: whoever applies the change must keep the
value it already holds.
"""

from __future__ import annotations

from enum import Enum
from typing import Final


class _Unchanged(Enum):
    UNCHANGED = "unchanged-toast"

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __bool__(self) -> bool:
        # Truthiness would invite `if value:` checks that confuse it with NULL or empty.
        raise TypeError("UNCHANGED has no truth value; compare with `is UNCHANGED`")


UNCHANGED: Final = _Unchanged.UNCHANGED
Unchanged = _Unchanged
