"""The one exception type the library raises for bad input; its message is one line: problem, then fix."""


class FascError(Exception):
    """A user-facing error: `str(e)` names the problem and the fix in one line."""


class Cancelled(FascError):
    """Long work stopped at the caller's request (a progress callback returning False, or `should_stop()`);
    nothing half-done is kept."""


def disk_error(e: BaseException) -> str | None:
    """Why a write failed when `e` is a disk error — an `OSError`, or safetensors' own error wrapping one (its
    "I/O error: No space left on device (os error 28)" is not an `OSError`) —, else None."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if type(e).__name__ == "SafetensorError" and "I/O error: " in str(e):
        return str(e).split("I/O error: ", 1)[1]
    return None
