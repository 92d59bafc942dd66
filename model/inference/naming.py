"""What a run of ``transfiner predict`` calls each input: its image id and its overlay file."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import PurePath, PurePosixPath


def image_ids(paths: Sequence[str | PurePath]) -> list[str]:
    """Each input's ``image_id`` in the results: its file name, or the path (or URL) as given where
    another input has the same file name, so that no two images share an id."""
    given = [path if isinstance(path, str) else path.as_posix() for path in paths]
    file_names = [PurePosixPath(path).name for path in given]
    names = Counter(file_names)
    ids = [name if names[name] == 1 else path for name, path in zip(file_names, given)]
    repeated = [image_id for image_id, count in Counter(ids).items() if count > 1]
    if repeated:
        raise ValueError(f"{repeated[0]} is given more than once")
    return ids


def overlay_names(paths: Sequence[str | PurePath]) -> list[str]:
    """Each input's overlay file: ``<stem>.png``; where inputs share a stem (d1/x.png, d2/x.png,
    x.jpg), the fewest trailing parts of their paths that tell them apart, joined by ``__``, plus
    ``.png`` (d1__x.png.png, d2__x.png.png, x.jpg.png)."""
    paths = [PurePosixPath(path) if isinstance(path, str) else path for path in paths]
    stems = Counter(path.stem for path in paths)
    names = []
    for path in paths:
        if stems[path.stem] == 1:
            names.append(f"{path.stem}.png")
            continue
        alike = [other.parts for other in paths if other.stem == path.stem]
        for depth in range(1, len(path.parts) + 1):
            tail = path.parts[-depth:]
            if sum(other[-depth:] == tail for other in alike) == 1:
                break
        names.append("__".join(tail) + ".png")
    if len(set(names)) < len(names):  # only names that were built to look alike, such as a__b/x and a/b/x
        raise ValueError(f"the overlays of two inputs would both be named {Counter(names).most_common(1)[0][0]}")
    return names
