"""Errors a user can cause. The CLI prints them as one line and exits 2; anything else is a bug."""


class AstraeaError(Exception):
    """Bad input the user can fix: the message names what to fix."""


class ConfigError(AstraeaError):
    """A model.yaml problem, located by its key path (e.g. `video.frames`)."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}" if path else message)
