"""Settings dataclasses check their fields in `__post_init__` and report every problem at once.

A problem reads `field = value: expected ...`, the field named by its run-config path
(configs/common.py), so `clara-jax train` prints the same line whichever dataclass owns the field,
and a config with several mistakes is fixed in one round (training/run_spec.py collects them).
"""

from __future__ import annotations


class SettingsError(ValueError):
    """Every problem of one settings object, one `field = value: expected ...` line each."""

    def __init__(self, problems):
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


Check = tuple[str, object, bool, str]  # (field, value, ok, expected)


def field_problems(*checks: Check) -> list[str]:
    """The `field = value: expected ...` line of each failed check."""
    return [f"{field} = {value!r}: expected {expected}" for field, value, ok, expected in checks if not ok]


def check_fields(*checks: Check) -> None:
    """Raise a SettingsError listing the failed checks, if any."""
    problems = field_problems(*checks)
    if problems:
        raise SettingsError(problems)
