"""Linux's per-process futex hash, sized for a thread per connection.

Every lock a thread sleeps on (a parked reader's, the GIL's) is a futex, and the kernel
finds a futex's sleepers in a hash table. Since Linux 6.16 a process gets a table of
its own, of 16 slots, which it does not grow: with 20,000 threads asleep, each slot
holds about 1,200 of them, and waking any one thread walks its slot's list. Measured
here with 20,000 threads each asleep on a lock of its own, releasing one of the locks
took ~740 us with 16 slots against ~150 us with 16,384, and the kernel's ``futex_wake``
was over half of the server's CPU time while thousands of connections ended at once.
``prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_SET_SLOTS, n)`` sets the size.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

logger = logging.getLogger(__name__)

_PR_FUTEX_HASH = 78
_SET_SLOTS = 1
_GET_SLOTS = 2


def ensure_slots(threads: int) -> Optional[int]:
    """Give this process's futex hash at least one slot per thread of ``threads`` (a power
    of two); returns the slots in effect, or None where the kernel has no such setting.
    Never shrinks it; never raises."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        current = prctl(_PR_FUTEX_HASH, _GET_SLOTS, 0, 0, 0)
        if current < 0:  # EINVAL: a kernel without private futex hashes
            return None
        want = 1 << max(4, threads - 1).bit_length()
        if current >= want:  # (0: no table of its own yet, or the global one)
            return int(current)
        if prctl(_PR_FUTEX_HASH, _SET_SLOTS, want, 0, 0) != 0:
            logger.debug("cannot set the futex hash to %d slots: errno %d", want, ctypes.get_errno())
            return int(current)
        return want
    except (OSError, AttributeError, ImportError) as exc:
        logger.debug("cannot size the futex hash: %s", exc)
        return None
