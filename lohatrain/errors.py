"""Errors a user can cause; their message is shown as-is in the WebUI tab, so it must say what to fix."""


class LohatrainError(Exception):
    """A problem the user can fix (bad setting, bad dataset, disk full...)."""


class DatasetError(LohatrainError):
    """The dataset folder cannot be trained on as it is."""


class SettingsError(LohatrainError):
    """One or more settings are invalid; `problems` lists one message per bad value."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Please fix these settings:\n" + "\n".join(f"- {p}" for p in problems))
