"""The one exception type for mistakes a user can fix.

The command line prints a :class:`UserError` as one line (what, where, how to fix) and
exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: a path, a config value, a data file, an argument.

    Args:
        what: what is wrong, e.g. ``"unknown config key 'ppo.lr'"``.
        where: where it is, e.g. a file path with a line number. Optional.
        fix: how to fix it, e.g. ``"did you mean 'ppo.learning_rate'?"``. Optional.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"in {self.where}")
        msg = " ".join(parts)
        if self.fix:
            msg += f": {self.fix}"
        return msg
