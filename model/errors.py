"""The project's one error type for mistakes a user can fix.

Commands catch `UserError` and print its message, one sentence, as `error: …`; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; scripts print its message (one sentence) and exit."""
