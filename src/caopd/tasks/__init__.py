"""Verifiable tasks. Importing this package registers the built-in ones."""

from caopd.tasks.base import Example, FieldError, Task, get_task, register_task, task_names
from caopd.tasks import arithmetic  # noqa: F401  (registers "arithmetic")

__all__ = ["Example", "FieldError", "Task", "get_task", "register_task", "task_names"]
