"""Where image+caption pairs come from: a hub id, a folder saved with `save_to_disk`, an
imagefolder with metadata.jsonl (or .csv) at the top or under train/ (the Lab's layouts), or a
folder of images with same-named .txt (or .caption) captions, where an image without one may take
`default_caption` or the trigger word, or, in a kohya-style folder (`10_sks dog/`), its folder's
name (kohya.py). Every source becomes a `datasets.Dataset` with an image column and a caption
column, checked here, and a folder's repeats in REPEATS_COLUMN when it has kohya-style folders."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..hub_ids import names_a_path
from .captions import CAPTION_EXTENSIONS, caption_files
from .kohya import describe, folder_of, is_mask, kohya_folders

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
REPEATS_COLUMN = "_repeats"  # each row's repeats an epoch, from its kohya-style folder (absent: 1)
FOLDER_NAMES = "folder names"


def row_repeats(records) -> list[int]:
    """Each row's repeats an epoch as its source says (kohya-style folders), 1 for every other."""
    if REPEATS_COLUMN in records.column_names:
        return [int(r) for r in records[REPEATS_COLUMN]]
    return [1] * len(records)


def load_records(dataset_name: str, image_column: str, caption_column: str, problems: list[str] | None = None,
                 allow_outside: bool = False, skip_folders: tuple[Path, ...] = (), *, caption_extension: str = ".txt",
                 default_caption: str = "", trigger_word: str = "", notes: list[str] | None = None):
    """The dataset's training split as a `datasets.Dataset`, with both columns checked.

    In a folder of images, an image's caption is the `caption_extension` file beside it; an image
    without one is captioned by its kohya-style folder's name, else `default_caption`, else
    `trigger_word`, else refused. How many captions came from where (and the folders' repeats)
    are lines added to `notes`. A `masks/` folder is never read as images. Other sources are read
    as they are.

    Rows of a local folder that cannot be used (a caption file that is not UTF-8, a metadata line
    that is not JSON or names no file, a file outside the folder unless `allow_outside`, images
    sharing one caption file) are left out and described in `problems`; without that list the
    first one raises InputError. A folder of captioned images is listed without its hidden files
    and folders and without `skip_folders` (the run's own outputs)."""
    path = Path(dataset_name).expanduser()
    found: list[str] = [] if problems is None else problems
    if path.is_dir():
        fallback = _Fallback(caption_extension, default_caption, trigger_word, [] if notes is None else notes)
        records = _load_folder(path, image_column, caption_column, found, allow_outside, skip_folders, fallback)
    elif path.exists():
        raise InputError(f"dataset_name: '{dataset_name}' is a file; give a dataset folder or a hub id.")
    elif names_a_path(dataset_name):
        raise InputError(f"dataset_name: there is no folder '{dataset_name}'.")
    else:
        records = _load_hub(dataset_name)
    if problems is None and found:
        raise InputError(f"dataset_name: {found[0]}")
    _check_columns(records, dataset_name, image_column, caption_column)
    return records


def _load_hub(dataset_id: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:
        raise InputError(f"dataset_name: could not load '{dataset_id}' from the hub "
                         f"({type(exc).__name__}: {exc}).") from None


@dataclass(frozen=True)
class _Fallback:
    """How a folder of images is captioned: its caption files' extension, what an image without
    one gets, and where the line counting the captions' sources goes."""
    caption_extension: str = ".txt"
    default_caption: str = ""
    trigger_word: str = ""
    notes: list[str] = field(default_factory=list)

    def caption(self) -> tuple[str, str]:
        """(the caption of an image without a file, the parameter it comes from); ("", "") for none."""
        if self.default_caption.strip():
            return self.default_caption.strip(), "default_caption"
        if self.trigger_word.strip():
            return self.trigger_word.strip(), "trigger_word"
        return "", ""


def _load_folder(path: Path, image_column: str, caption_column: str, problems: list[str], allow_outside: bool,
                 skip_folders: tuple[Path, ...], fallback: _Fallback):
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else next(iter(loaded))
            loaded = loaded[split]
        return loaded
    metadata = _metadata_files(path)
    if metadata:
        return _load_metadata(path, metadata, problems, allow_outside)
    return _load_captioned_images(path, image_column, caption_column, problems, allow_outside, skip_folders, fallback)


def _metadata_files(path: Path) -> list[Path]:
    """metadata.jsonl/.csv at the top; else where Lab-made datasets keep them, under train/ and
    train/<label>/ (the layouts datasets' imagefolder reads)."""
    def found(folder: Path) -> list[Path]:
        return [folder / name for name in ("metadata.jsonl", "metadata.csv") if (folder / name).is_file()][:1]

    train = path / "train"
    labels = sorted(p for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
    return found(path) or [file for folder in (train, *labels) for file in found(folder)]


def _outside(path: Path, folder: Path) -> bool:
    return not path.resolve().is_relative_to(folder.resolve())


def _metadata_rows(metadata: Path, problems: list[str]) -> list[tuple[str, dict]]:
    """(where, row) for each readable row of metadata.jsonl / metadata.csv."""
    import csv

    try:
        text = metadata.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{metadata}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return []
    if metadata.suffix == ".csv":
        return [(f"{metadata.name} row {n}", row) for n, row in enumerate(csv.DictReader(io.StringIO(text)), 2)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{metadata.name} line {n}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{metadata.name} line {n}: not a JSON object")
            continue
        rows.append((f"{metadata.name} line {n}", row))
    return rows


def _load_metadata(folder: Path, metadata_files: list[Path], problems: list[str], allow_outside: bool):
    """An imagefolder: metadata rows with file_name (relative to the metadata file's folder) and other
    columns; the images land in an `image` column, as datasets' imagefolder loader names it."""
    import datasets

    columns: dict[str, list] = {"image": []}
    kept = 0
    rows = [(metadata, where, row) for metadata in metadata_files for where, row in _metadata_rows(metadata, problems)]
    for metadata, where, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}: no file_name")
            continue
        file = metadata.parent / name
        if not file.is_file():
            problems.append(f"{where}: file_name '{name}' is not a file in {metadata.parent}")
            continue
        if not allow_outside and _outside(file, folder):
            problems.append(f"{file}: leads outside the dataset folder (to {file.resolve()}); set "
                            "allow_files_outside_dataset to use it")
            continue
        for key, value in row.items():
            if key != "file_name":
                columns.setdefault(key, [None] * kept).append(value)
        columns["image"].append(str(file))
        kept += 1
        for values in columns.values():
            values.extend([None] * (kept - len(values)))
    if not kept:
        raise InputError(f"dataset_name: {', '.join(map(str, metadata_files))} list no usable image" +
                         (f" ({len(problems)} problem(s), e.g. {problems[0]})." if problems else "."))
    return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())


def listed_files(folder: Path, skip_folders: tuple[Path, ...] = ()) -> list[Path]:
    """The files under `folder`, sorted, without hidden ones (a name starting with '.', such as
    macOS's `._photo.png`, or anything inside a hidden folder) and without what lies in
    `skip_folders` that lie inside `folder` (the run's output folder, say)."""
    root = folder.resolve()
    skipped = [s for s in (Path(f).expanduser().resolve() for f in skip_folders) if s != root and s.is_relative_to(root)]
    in_skipped: dict[Path, bool] = {}  # per parent folder
    files = []
    for file in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in file.relative_to(folder).parts):
            continue
        if file.parent not in in_skipped:
            in_skipped[file.parent] = any(file.parent.resolve().is_relative_to(s) for s in skipped)
        if not in_skipped[file.parent] and file.is_file():
            files.append(file)
    return files


def _load_captioned_images(path: Path, image_column: str, caption_column: str, problems: list[str],
                           allow_outside: bool, skip_folders: tuple[Path, ...], fallback: _Fallback):
    import datasets

    files = listed_files(path, skip_folders)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask(p, path)]
    if not images:
        raise InputError(f"dataset_name: folder '{path}' holds no images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}), no metadata.jsonl and no saved dataset.")
    extension = fallback.caption_extension
    captions_of, refused = caption_files(images, files, problems, extension)
    folders = kohya_folders(path, images)
    uncaptioned = [p for p in images if p not in captions_of and p not in refused and not folder_of(p, path, folders)]
    default, default_source = fallback.caption()
    if uncaptioned and not default:
        other = next((e for e in CAPTION_EXTENSIONS if e != extension.lower() and
                      any(f.suffix.lower() == e for f in files)), None)
        hint = f"; the folder has {other} files: set caption_extension to '{other}' to read them" if other else ""
        raise InputError(f"dataset_name: {len(uncaptioned)} image(s) in '{path}' have no caption file "
                         f"(e.g. {uncaptioned[0].name} needs {uncaptioned[0].stem}{extension} beside it{hint}), and "
                         "there is no metadata.jsonl. Add the caption files, or set default_caption (the caption "
                         "of every image without a file) or trigger_word (then the trigger word alone is their "
                         "caption).")
    kept, captions, sources, repeats = [], [], [], []
    for image in images:
        caption_file = captions_of.get(image)
        if caption_file is None and image in refused:
            continue
        outside = [f for f in (image, caption_file) if f is not None and _outside(f, path)]
        if outside and not allow_outside:
            problems.extend(f"{f}: leads outside the dataset folder (to {f.resolve()}); set "
                            "allow_files_outside_dataset to use it" for f in outside)
            continue
        folder = folder_of(image, path, folders)
        if caption_file is None and folder is not None:
            captions.append(folder.name)
            sources.append(FOLDER_NAMES)
        elif caption_file is None:
            captions.append(default)
            sources.append(default_source)
        else:
            try:
                captions.append(caption_file.read_text(encoding="utf-8").strip())
            except UnicodeDecodeError as exc:
                problems.append(f"{caption_file}: caption is not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            sources.append(f"{extension} files")
        kept.append(image)
        repeats.append(folder.repeats if folder else 1)
    if not kept:
        raise InputError(f"dataset_name: no usable image in '{path}' ({len(problems)} problem(s), "
                         f"e.g. {problems[0]}).")
    counts = Counter(sources)  # the files' count first, then the fallback's
    fallback.notes.append("Captions: " + ", ".join(
        f"{counts[source]} from {source}" for source in (f"{extension} files", FOLDER_NAMES, default_source)
        if counts[source]) + ".")
    columns = {image_column: [str(p) for p in kept], caption_column: captions}
    if folders:
        in_folder = Counter(path / p.relative_to(path).parts[0] for p in kept if folder_of(p, path, folders))
        fallback.notes.append(describe(folders, in_folder, sum(not folder_of(p, path, folders) for p in kept)))
        columns[REPEATS_COLUMN] = repeats
    table = datasets.Dataset.from_dict(columns)
    return table.cast_column(image_column, datasets.Image())


def _check_columns(records, dataset_name: str, image_column: str, caption_column: str) -> None:
    if len(records) == 0:
        raise InputError(f"dataset_name: '{dataset_name}' has no training rows.")
    columns = list(records.column_names)
    for name, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in columns:
            raise InputError(f"{name}: '{column}' is not a column of '{dataset_name}'; its columns "
                             f"are: {', '.join(columns)}.")
