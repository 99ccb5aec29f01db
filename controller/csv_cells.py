"""CSV cells that a spreadsheet will not run: text starting = + - @ (or tab, CR) is a
formula to Excel and LibreOffice (CSV injection), so such a cell gets a leading '."""

from __future__ import annotations

from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """Numbers as they are; text that a spreadsheet would evaluate, quoted with '."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(values: list[Any]) -> list[Any]:
    return [safe_cell(v) for v in values]
