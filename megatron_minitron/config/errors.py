"""The one exception type for bad user input: it names the field and the fix."""


class ConfigError(ValueError):
    """Bad configuration, checkpoint or data. The message names the field and how to fix it."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        super().__init__(f"{field}: {problem}. Fix: {fix}")
