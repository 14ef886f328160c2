"""Tasks, readers and batching: every task yields :class:`PairExample` rows."""

from dist_robust.data.examples import PairExample
from dist_robust.data.tasks import TaskData, get_task

__all__ = ["PairExample", "TaskData", "get_task"]
