"""Errors of the southbound, each saying which switch and which entity."""

from __future__ import annotations

from dataclasses import dataclass


class SouthboundError(RuntimeError):
    """Base of every error the southbound raises."""


class TranslationError(SouthboundError, ValueError):
    """An entity does not fit the P4 program (unknown name, value too wide, ...)."""


class NotPrimaryError(SouthboundError):
    """A write was attempted while this controller is not the switch's primary."""


class SwitchUnavailable(SouthboundError):
    """The switch is not connected (yet, or any more)."""


class PipelineError(SouthboundError):
    """The switch refused the P4 program, or has none and we have none to give."""


@dataclass(frozen=True)
class UpdateFailure:
    """One update of a batch that the switch refused."""

    index: int  # position in the WriteRequest
    update_type: str  # INSERT, MODIFY, DELETE
    entity: object  # the controller.entries entity (or the protobuf when untranslatable)
    code: str  # google.rpc.Code name, e.g. ALREADY_EXISTS
    message: str

    def __str__(self) -> str:
        return f"#{self.index} {self.update_type} {self.entity}: {self.code} {self.message}"


class WriteError(SouthboundError):
    """Some updates of a batched Write failed; the others were applied (CONTINUE_ON_ERROR)."""

    def __init__(self, switch: str, failures: list[UpdateFailure], total: int,
                 detail: str = "") -> None:
        self.switch = switch
        self.failures = failures
        self.total = total
        lines = [f"switch {switch}: {len(failures)} of {total} updates failed"
                 + (f" ({detail})" if detail else "")]
        lines += [f"  {failure}" for failure in failures[:50]]
        if len(failures) > 50:
            lines.append(f"  ... and {len(failures) - 50} more")
        super().__init__("\n".join(lines))
