"""What a conversion did and what did not fit: the report every direction returns, and its error."""

from __future__ import annotations

import dataclasses

from .matching import Entry
from .paths import display_name


@dataclasses.dataclass
class PortReport:
    """What a conversion did and what did not fit (torch's ``_IncompatibleKeys`` and more)."""

    matched: list[Entry] = dataclasses.field(default_factory=list)
    missing_keys: list[str] = dataclasses.field(default_factory=list)
    unexpected_keys: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: list[str] = dataclasses.field(default_factory=list)
    dtype_mismatches: list[str] = dataclasses.field(default_factory=list)
    filled: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    hints: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No missing/unexpected keys and no shape/dtype mismatches."""
        return not (self.missing_keys or self.unexpected_keys or self.shape_mismatches
                    or self.dtype_mismatches)

    def errors_text(self) -> str:
        """torch-style listing of every problem, one category per line."""
        lines = []
        if self.missing_keys:
            lines.append("\tMissing key(s): " + ", ".join(f'"{k}"' for k in self.missing_keys) + ".")
        if self.unexpected_keys:
            lines.append("\tUnexpected key(s): " + ", ".join(f'"{k}"' for k in self.unexpected_keys) + ".")
        lines += [f"\tsize mismatch for {m}" for m in self.shape_mismatches]
        lines += [f"\tdtype mismatch for {m}" for m in self.dtype_mismatches]
        lines += [f"\thint: {h}" for h in self.hints]
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [f"{e.torch_key:40s} -> {display_name(e.flax_path):45s} {e.transform:8s} "
                f"{e.torch_shape} -> {e.flax_shape}" for e in self.matched]
        rows += [f"{k:40s} -> (from target) num_batches_tracked absent: version-1 checkpoint"
                 for k in self.filled]
        rows += [f"{k:40s} -> (dropped by rules)" for k in self.ignored]
        status = "OK" if self.ok else "PROBLEMS:\n" + self.errors_text()
        return "\n".join(rows + [f"{len(self.matched)} tensors mapped; {status}"])


class PortingError(ValueError):
    """The checkpoint does not fit the target; ``.report`` holds every problem.

    PyTorch equivalent: the ``RuntimeError`` of ``load_state_dict(strict=True)``, same wording.
    """

    def __init__(self, report: PortReport, what: str):
        self.report = report
        super().__init__(f"Error(s) in loading {what}:\n{report.errors_text()}")
