"""Verifiable tasks. Importing this package registers the built-in ones."""

from caopd.tasks.base import Example, FieldError, Task, get_task, register_task, task_names
from caopd.tasks import arithmetic  # noqa: F401  (registers "arithmetic")
from caopd.tasks import mcq  # noqa: F401  (registers "mcq")
from caopd.tasks import tooluse  # noqa: F401  (registers "tooluse")

__all__ = ["Example", "FieldError", "Task", "get_task", "register_task", "task_names"]
