"""What every per-tensor loader task of ours shares with mergekit's own `LoadTensor`."""

from __future__ import annotations

from typing import Dict, Optional

from mergekit.graph import Task


class LoaderTask:
    """Mixin for a `Task` that loads one output tensor's side inputs (Fishers, Grams): no task
    arguments, on the CPU, scheduled late and freed early like `LoadTensor`, grouped by the output
    tensor it serves. The task class must have an `output_name` field (not declared here: this is
    not a pydantic model, and the field belongs to the task's own schema)."""

    def arguments(self) -> Dict[str, Task]:
        return {}

    def uses_accelerator(self) -> bool:
        return False

    def priority(self) -> int:
        return -1000  # as mergekit's LoadTensor: load late, free early

    def group_label(self) -> Optional[str]:
        return self.output_name
