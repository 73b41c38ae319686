"""The one exception the local stack raises.

Every failure a user can act on (port taken, Maven offline, a binary missing, a service that never
became ready) is turned into a `StackError` whose message says what happened *and what to do*, so
the CLI can print it without a traceback.
"""

from __future__ import annotations


class StackError(RuntimeError):
    """A local-stack operation failed; the message tells the user how to fix it."""
