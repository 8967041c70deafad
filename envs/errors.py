"""The error every env suite raises for a bad id, option or missing dependency (its own module, so
that the suites and envs/make.py, which dispatches to them, do not import each other)."""


class EnvError(ValueError):
    """A bad environment id or option; its message is one line that says how to fix it."""
