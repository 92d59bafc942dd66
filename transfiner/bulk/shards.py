"""The output folder of a bulk job: JSON Lines shards committed atomically, a manifest, errors.

- ``part-NNNNN.jsonl``: one line an image that was segmented; ``part-NNNNN.errors.jsonl``: one
  line an image that could not be read, decoded or segmented, with the reason.
- A shard is committed when its ``part-NNNNN.jsonl`` appears: its errors file is renamed into place
  first, then the results file (each written to a temporary name and synced before). An image
  belongs to the job's output exactly when a committed shard holds it, so a job killed at any point
  and resumed writes each image once.
- ``manifest.json`` lists the committed shards and the job's settings (rewritten at each commit);
  ``errors.jsonl`` gathers the committed errors (when the job opens and closes). Both are made
  from the shards, never the reverse, and replaced atomically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARD = re.compile(r"part-(\d{5,})\.jsonl")


class OutputError(ValueError):
    """An output folder that this job may not write to (results of another job, or no --resume)."""


@dataclass
class Committed:
    """What the folder's committed shards hold."""

    shards: list[dict[str, Any]] = field(default_factory=list)  # manifest entries, in shard order
    image_ids: set[str] = field(default_factory=set)  # every image in them, segmented or failed

    @property
    def images(self) -> int:
        return sum(shard["images"] for shard in self.shards)

    @property
    def failed(self) -> int:
        return sum(shard["failed"] for shard in self.shards)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class ShardStore:
    """Commits shards to ``root`` and reads back what is committed there."""

    def __init__(self, root: str | os.PathLike, job: dict[str, Any]) -> None:
        self.root = Path(root)
        self.job = job  # the model and options: a resumed job must have the same
        self.committed = Committed()
        self._next = 0

    def open(self, resume: bool) -> Committed:
        """Prepares the folder: leftovers of an interrupted commit removed, the committed shards read.

        - Without ``resume`` the folder must hold no committed shard.
        - With it, the committed shards must come from the same model and options.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob("*.tmp"):
            leftover.unlink()
        numbers = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := SHARD.fullmatch(p.name)))
        for errors in self.root.glob("part-*.errors.jsonl"):  # renamed before its shard was: not committed
            if not (self.root / errors.name.replace(".errors.jsonl", ".jsonl")).exists():
                errors.unlink()
        if numbers and not resume:
            raise OutputError(
                f"{self.root} already holds the results of a job ({len(numbers)} shards): "
                "add --resume to continue it, or choose another --out folder"
            )
        manifest = self.root / "manifest.json"
        if numbers and manifest.exists():
            before = json.loads(manifest.read_text())["job"]
            changed = sorted(key for key in {*before, *self.job} if before.get(key) != self.job.get(key))
            if changed:
                raise OutputError(
                    f"{self.root} holds results of another job (it differs in {', '.join(changed)}): "
                    "resume with the same model and options, or choose another --out folder"
                )
        for number in numbers:
            self._read_shard(number)
        self._next = numbers[-1] + 1 if numbers else 0
        self._write_manifest()
        self._write_errors()
        return self.committed

    def _read_shard(self, number: int) -> None:
        results = self.root / f"part-{number:05d}.jsonl"
        errors = self.root / f"part-{number:05d}.errors.jsonl"
        ok = [line["image_id"] for line in _lines(results)]
        failed = [line["image_id"] for line in _lines(errors)] if errors.exists() else []
        self.committed.image_ids.update(ok + failed)
        self.committed.shards.append(
            {"file": results.name, "errors": errors.name if failed else None, "images": len(ok), "failed": len(failed)}
        )

    def commit(self, results: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
        """One shard: the lines of the images segmented and of those that failed."""
        if not results and not errors:
            return
        name = f"part-{self._next:05d}"
        self._next += 1
        if errors:
            _write_atomically(self.root / f"{name}.errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
        _write_atomically(self.root / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in results))
        self.committed.image_ids.update(line["image_id"] for line in results + errors)
        self.committed.shards.append(
            {
                "file": f"{name}.jsonl",
                "errors": f"{name}.errors.jsonl" if errors else None,
                "images": len(results),
                "failed": len(errors),
            }
        )
        self._write_manifest()

    def close(self) -> None:
        """``errors.jsonl`` brought up to date (a job killed before it is closed has it from its start)."""
        self._write_errors()

    def _write_manifest(self) -> None:
        manifest = {
            "job": self.job,
            "images": self.committed.images,
            "failed": self.committed.failed,
            "shards": self.committed.shards,
        }
        _write_atomically(self.root / "manifest.json", json.dumps(manifest, indent=1) + "\n")

    def _write_errors(self) -> None:
        errors = [
            (self.root / shard["errors"]).read_text(encoding="utf-8")
            for shard in self.committed.shards
            if shard["errors"]
        ]
        _write_atomically(self.root / "errors.jsonl", "".join(errors))

    def coco_results(self) -> list[dict[str, Any]]:
        """Every committed instance as a COCO results record (what local ``transfiner predict`` writes)."""
        records = []
        for shard in self.committed.shards:
            for line in _lines(self.root / shard["file"]):
                for instance in line["instances"]:
                    record = {"image_id": line["image_id"], **instance}
                    record.pop("category_name", None)
                    records.append(record)
        return records
