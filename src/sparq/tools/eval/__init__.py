"""Evaluation: tasks, a resumable runner, reports and the `sparq eval` command."""

from .command import eval_command

__all__ = ["eval_command"]
