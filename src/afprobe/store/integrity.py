"""`afprobe verify`: is what afprobe wrote under a folder still what it wrote?

Two kinds of folders carry checksums: activation stores (each shard's row file records the SHA-256 of its tensors,
and `SHA256SUMS` covers every file once the store is finished) and results folders (`SHA256SUMS`, written by
`afprobe.files.results_folder` whenever a job finishes writing there). `verify_tree` finds both below a folder and
names every file that is missing, unreadable or changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from afprobe.artefacts import ARTEFACTS
from afprobe.files import CHECKSUMS, Damage, file_sha256, verify_folder


@dataclass
class VerifyReport:
    """What `verify_tree` checked and what it found."""

    root: Path
    stores: list[Path] = field(default_factory=list)
    sealed: list[Path] = field(default_factory=list)  # results folders with SHA256SUMS
    unsealed: list[Path] = field(default_factory=list)  # folders with afprobe results but no checksums
    damage: list[Damage] = field(default_factory=list)
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.damage


def verify_store(folder: Path) -> tuple[list[Damage], int]:
    """Damaged files of one store, and how many files were checked."""
    damage: list[Damage] = []
    checked = 0
    try:
        json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        damage.append(Damage(folder / "meta.json", f"unreadable ({type(exc).__name__})"))
    for rows_file in sorted((folder / "shards").glob("shard-*.json")):
        tensors = rows_file.with_suffix(".safetensors")
        checked += 2
        try:
            recorded = json.loads(rows_file.read_text()).get("sha256")
        except (OSError, ValueError) as exc:
            damage.append(Damage(rows_file, f"unreadable ({type(exc).__name__})"))
            continue
        if not tensors.is_file():
            damage.append(Damage(tensors, "missing"))
        elif recorded is not None and file_sha256(tensors) != recorded:
            damage.append(Damage(tensors, "changed since it was written (checksum differs)"))
    listed = verify_folder(folder)
    seen = {d.path for d in damage}
    damage += [d for d in listed if d.path not in seen]
    return damage, checked + _listed_count(folder)


def _listed_count(folder: Path) -> int:
    path = folder / CHECKSUMS
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


# Files whose presence marks a folder as afprobe's results.
RESULT_FILES = {artefact.file for artefact in ARTEFACTS} | {"run.json", "organism.json"}


def _covered(folder: Path, sealed: list[Path]) -> bool:
    """Whether a sealed folder above `folder` lists files inside it."""
    for parent in sealed:
        if parent in folder.parents:
            prefix = folder.relative_to(parent).as_posix() + "/"
            path = parent / CHECKSUMS
            if any(line.partition("  ")[2].startswith(prefix) for line in path.read_text().splitlines()):
                return True
    return False


def verify_tree(root: str | Path) -> VerifyReport:
    """Check every store and every sealed results folder at or below `root`."""
    root = Path(root)
    report = VerifyReport(root=root)
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith("."))]
    for folder in folders:
        if (folder / "meta.json").is_file() and (folder / "shards").is_dir():
            damage, checked = verify_store(folder)
            report.stores.append(folder)
        elif (folder / CHECKSUMS).is_file():
            damage, checked = verify_folder(folder), _listed_count(folder)
            report.sealed.append(folder)
        else:
            if any((folder / name).is_file() for name in RESULT_FILES) and not _covered(folder, report.sealed):
                report.unsealed.append(folder)
            continue
        report.damage += damage
        report.files_checked += checked
    return report
