"""What the generation loop needs from a teacher, and the error of a teacher that stays unreachable."""

from __future__ import annotations

from typing import Any, Protocol

from distill.errors import ModelError
from distill.generate.prompts import PromptRow

__all__ = ["Teacher", "TeacherUnavailableError"]


class TeacherUnavailableError(ModelError):
    """The teacher API kept failing (connection errors, 429 or 5xx) after every retry."""


class Teacher(Protocol):
    """What the generation loop needs from a teacher."""

    def identity(self) -> dict[str, Any]:
        """What names the teacher in the meta file (a resume with another teacher is refused)."""
        ...

    def complete(self, row: PromptRow, count: int, seed: int) -> list[str]:
        """``count`` completions of ``row`` (before stop strings and filters)."""
        ...
