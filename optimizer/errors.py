"""Errors a user can cause. The CLI prints them as one line and exits 2; anything else is a bug."""


class AstraeaError(Exception):
    """Bad input the user can fix: the message names what to fix."""


class ConfigError(AstraeaError):
    """A model.yaml problem, located by its key path (e.g. `video.frames`)."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}" if path else message)


class EngineError(AstraeaError):
    """An engine folder or engine build that cannot be used as it is: the message names what to fix."""


def nearest(key: str, valid) -> str:
    """' (did you mean 'x'?)' for a near miss, else '; valid: a, b, c'."""
    import difflib

    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid: {', '.join(valid)}"
