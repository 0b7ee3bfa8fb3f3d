"""The project's exceptions. ``cli`` turns them into one line on stderr and an exit code."""


class SimpleCNNError(Exception):
    """A problem the user can fix; the message says what and how. Exit code 1."""

    exit_code = 1


class UsageError(SimpleCNNError):
    """A bad flag or flag value. Exit code 2, like argparse's own usage errors."""

    exit_code = 2


class DataError(SimpleCNNError):
    """A dataset, image or model file that cannot be used as given."""
