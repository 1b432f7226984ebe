"""Verifiable tasks. Importing this package registers the built-in ones."""

from caopd.tasks import (
    arithmetic,  # noqa: F401  (registers "arithmetic")
    mcq,  # noqa: F401  (registers "mcq")
    tooluse,  # noqa: F401  (registers "tooluse")
)
from caopd.tasks.base import (
    Example,
    FieldError,
    Task,
    get_task,
    register_task,
    task_names,
)

__all__ = ["Example", "FieldError", "Task", "get_task", "register_task", "task_names"]
