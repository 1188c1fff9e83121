"""The one atomic write: a file or folder appears under its name complete, or not at all.

A file is written as a hidden `.NAME.partial` beside its target and renamed over it. A folder is
built in `.NAME.partial-*` beside its target, renamed `.NAME.ready-*` once complete, then swapped
in for the target, so a crash never leaves half a folder under the target's name. A run killed
midway leaves `.NAME.partial-*` (incomplete), `.NAME.ready-*` (complete, not yet in place) or
`.NAME.old-*` (the previous one, being replaced); `recover_leftovers` sorts them out next time.
Everything written gets the user's usual permissions (mkdtemp makes 0700, safetensors 0600).

Ground floor: imports nothing of the package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FOLDER_MODE = 0o777 & ~_current_umask()  # what mkdir would give


def file_mode() -> int:
    """What open() gives a new file under the current umask."""
    return 0o666 & ~_current_umask()


def give_user_modes(folder: Path) -> None:
    """Every file under `folder` with the user's usual mode."""
    mode = file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


# --- files -----------------------------------------------------------------------------------

def write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """write(partial) writes the file at `.NAME.partial` beside `path`, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        partial.chmod(file_mode())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_file(path, lambda partial: partial.write_text(text))


# --- folders ---------------------------------------------------------------------------------

def staging_dir(target: Path, tag: str | None = None) -> Path:
    """An empty `.NAME.partial-*` folder beside `target`. A fixed `tag` gives the same name in
    every process (accelerate writes one file per process into one folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if tag is None:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    else:
        staging = target.parent / f".{target.name}.partial-{tag}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    staging.chmod(FOLDER_MODE)
    return staging


def write_folder(target: Path, write_contents: Callable[[Path], object], keep_existing: bool = False) -> Path:
    """Call write_contents(staging folder), then put it in place of `target`: an older folder there
    is replaced only once the new one is complete. With `keep_existing`, a folder that appeared at
    `target` meanwhile (another process wrote the same thing) is kept and ours dropped."""
    target = Path(target)
    staging = staging_dir(target)
    try:
        write_contents(staging)
        commit(staging, target, keep_existing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def commit(staging: Path, target: Path, keep_existing: bool = False) -> None:
    """Put the complete folder `staging` in place of `target` (first marking it complete)."""
    ready = staging.with_name(staging.name.replace(".partial-", ".ready-", 1))
    give_user_modes(staging)
    staging.rename(ready)
    try:
        if keep_existing and target.exists():
            shutil.rmtree(ready, ignore_errors=True)
            return
        _swap_in(ready, target, keep_existing)
    except BaseException:
        shutil.rmtree(ready, ignore_errors=True)
        raise


def _swap_in(staging: Path, target: Path, keep_existing: bool = False) -> None:
    if not target.exists():
        try:
            staging.rename(target)
        except OSError:  # another process put its own there first
            if not (keep_existing and target.exists()):
                raise
            shutil.rmtree(staging, ignore_errors=True)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def remove_folder(target: Path) -> None:
    """Delete a folder so that a kill midway leaves an `.old-*` leftover, never a half folder."""
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    shutil.rmtree(retired, ignore_errors=True)


def leftovers(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """{NAME: {"partial"|"ready"|"old": [paths]}} for the hidden leftovers in `folder`."""
    found: dict[str, dict[str, list[Path]]] = {}
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        if not path.name.startswith("."):
            continue
        for kind in ("partial", "ready", "old"):
            name, sep, _ = path.name[1:].rpartition(f".{kind}-")
            if sep and name:
                found.setdefault(name, {"partial": [], "ready": [], "old": []})[kind].append(path)
                break
    return found


def recover_leftovers(folder: Path, only: str | None = None) -> list[str]:
    """Tidy what killed writes left in `folder` (for the folder named `only`, or all), and say what
    was done. A complete new folder (`.ready-*`) is put in place; when a swap was cut between its two
    renames, the previous folder comes back if there is no complete new one; the rest is removed."""
    notes = []
    for name, kinds in leftovers(Path(folder)).items():
        if only is not None and name != only:
            continue
        target = Path(folder) / name
        ready = sorted(kinds["ready"], key=lambda p: p.stat().st_mtime_ns)
        if ready:
            _swap_in(ready.pop(), target)
            notes.append(f"{target}: put in place the complete folder an interrupted run had written.")
        elif not target.exists() and kinds["old"]:
            newest_old = max(kinds["old"], key=lambda p: p.stat().st_mtime_ns)
            newest_old.rename(target)
            kinds["old"].remove(newest_old)
            notes.append(f"{target}: restored the previous folder an interrupted write had moved aside.")
        stale = ready + kinds["partial"] + kinds["old"]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        if stale:
            notes.append(f"{target}: removed {len(stale)} leftover temporary folder(s) of interrupted writes.")
    return notes
