"""The one exception type the library raises for bad input; its message is one line: problem, then fix."""


class FascError(Exception):
    """A user-facing error: `str(e)` names the problem and the fix in one line."""


class Cancelled(FascError):
    """Long work stopped at the caller's request (a progress callback returning False, or `should_stop()`);
    nothing half-done is kept."""
