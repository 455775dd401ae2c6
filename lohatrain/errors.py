"""Errors a user can cause; their message is shown as-is in the WebUI tab, so it must say what to fix."""
class LohatrainError(Exception):
    """A problem the user can fix (bad setting, bad dataset, disk full...)."""
class DatasetError(LohatrainError):
    """The dataset folder cannot be trained on as it is."""
