"""DAVIS-Edit -> a catalog (spec §6): one job per video for a setting (text | image) and subset
(similar = DAVIS-Edit-S, changing = DAVIS-Edit-C).

Expected layout (the README's tree is inconsistent about where ``ReferenceImages`` and the caption files
sit, so both are looked up at the root and one level below)::

    ROOT/JPEGImages/[480p/]<video>/00000.jpg ...      official DAVIS frames
    ROOT/Annotations/[480p/]<video>/00000.png ...     palette masks (object ids; ingest binarises them)
    ROOT/ReferenceImages/{similar,changing}/<video>.png
    ROOT/edited_video_caption_dict_{text,image}.json  {video: {original, similar, changing}}

Text setting: the first frame is edited by inpainting the source object with the target caption (mode
``inpaint``); image setting: by the reference image (mode ``reference``). Both use the caption as the
generation prompt. Stray files (``Thumbs.db``, ``.DS_Store``) are ignored; videos without frames, caption
or reference image are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import typer  # module level: typer resolves the command's (string) annotations in these globals

log = logging.getLogger("v2v.davis_edit")

Setting = Literal["text", "image"]
Subset = Literal["similar", "changing"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_SEED = 42


class DavisEditError(ValueError):
    """The folder is not a DAVIS-Edit tree (the message says what is missing)."""


@dataclass
class DavisEditCatalog:
    path: Path
    jobs: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)  # video -> why


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _video_root(root: Path, kind: str) -> Path | None:
    """``ROOT/<kind>`` or its single resolution subfolder (``480p``, ``Full-Resolution``)."""
    base = root / kind
    if not base.is_dir():
        return None
    for res in ("480p", "Full-Resolution"):
        if (base / res).is_dir():
            return base / res
    return base


def _find(root: Path, name: str) -> Path | None:
    for candidate in [root / name, *(d / name for d in _visible_dirs(root))]:
        if candidate.exists():
            return candidate
    return None


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") for p in folder.iterdir())


def _caption(entry: Any, key: str) -> str | None:
    if not isinstance(entry, dict):
        return None
    value = entry.get(key)
    if isinstance(value, list):  # tolerate one-element lists
        value = value[0] if value else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # another drive (Windows): keep it absolute
        return str(path)


def davis_edit_jobs(root: str | os.PathLike[str], setting: Setting, subset: Subset, base: Path
                    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The catalog rows (paths relative to ``base``) and the skipped videos with the reason."""
    if setting not in ("text", "image"):
        raise DavisEditError(f"setting must be 'text' or 'image', got {setting!r}")
    if subset not in ("similar", "changing"):
        raise DavisEditError(f"subset must be 'similar' or 'changing', got {subset!r}")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DavisEditError(f"{root}: no such folder")
    frames_root = _video_root(root, "JPEGImages")
    if frames_root is None:
        raise DavisEditError(f"{root}: no JPEGImages/ folder (is this a DAVIS-Edit tree?)")
    masks_root = _video_root(root, "Annotations")
    captions_file = _find(root, f"edited_video_caption_dict_{setting}.json")
    if captions_file is None:
        raise DavisEditError(f"{root}: no edited_video_caption_dict_{setting}.json")
    try:
        captions = json.loads(captions_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DavisEditError(f"{captions_file}: not valid JSON ({exc})") from None
    if not isinstance(captions, dict):
        raise DavisEditError(f"{captions_file}: expected a mapping video -> captions")
    refs_root = _find(root, "ReferenceImages")
    if setting == "image" and refs_root is None:
        raise DavisEditError(f"{root}: no ReferenceImages/ folder (needed for the image setting)")

    jobs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for video_dir in _visible_dirs(frames_root):
        video = video_dir.name
        if not _has_images(video_dir):
            skipped[video] = f"no frames in {video_dir}"
            continue
        prompt = _caption(captions.get(video), subset)
        if prompt is None:
            skipped[video] = f"no {subset!r} caption in {captions_file.name}"
            continue
        row: dict[str, Any] = {"id": f"{video}-{setting}-{subset}", "source": _rel(video_dir, base)}
        mask_dir = masks_root / video if masks_root is not None else None
        if mask_dir is not None and mask_dir.is_dir() and _has_images(mask_dir):
            row["masks"] = _rel(mask_dir, base)
        else:
            skipped[video] = "no Annotations (the source object mask is needed)"
            continue
        if setting == "image":
            assert refs_root is not None
            ref = next((refs_root / subset / f"{video}{s}" for s in IMAGE_SUFFIXES
                        if (refs_root / subset / f"{video}{s}").is_file()), None)
            if ref is None:
                skipped[video] = f"no reference image ReferenceImages/{subset}/{video}.png"
                continue
            row.update(mode="reference", reference=_rel(ref, base))
        else:
            row["mode"] = "inpaint"
        row.update(prompt=prompt, seed=DEFAULT_SEED)
        jobs.append(row)
    for video, why in skipped.items():
        log.warning("DAVIS-Edit: skipping %s: %s", video, why)
    return jobs, skipped


def write_davis_edit_catalog(root: str | os.PathLike[str], out: str | os.PathLike[str],
                             setting: Setting = "text", subset: Subset = "similar") -> Path:
    """Write the YAML catalog for ``setting``/``subset`` to ``out``; returns its path."""
    import yaml

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs, skipped = davis_edit_jobs(root, setting, subset, out.parent.resolve())
    if not jobs:
        raise DavisEditError(f"{root}: no usable video for setting {setting!r}, subset {subset!r} "
                             f"(skipped: {skipped or 'none found'})")
    name = f"davis-edit-{'s' if subset == 'similar' else 'c'}-{setting}"
    doc = {"name": name,
           "description": f"DAVIS-Edit-{'S' if subset == 'similar' else 'C'} ({subset} shape), {setting}-"
                          f"prompted: {len(jobs)} videos from {Path(root).expanduser().resolve()}",
           "jobs": jobs}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=110))
    tmp.replace(out)
    return out


def register(app: Any) -> None:
    """Add ``catalog davis-edit`` to the typer ``app`` (reusing its ``catalog`` group when it has one)."""
    group = next((g.typer_instance for g in app.registered_groups if g.name == "catalog"), None)
    if group is None:
        group = typer.Typer(help="Build catalogs from datasets.", no_args_is_help=True)
        app.add_typer(group, name="catalog")

    @group.command("davis-edit")
    def davis_edit(
        root: Annotated[Path, typer.Argument(help="DAVIS-Edit folder (JPEGImages/, Annotations/, ...)")],
        setting: Annotated[str, typer.Option("--setting", help="text | image")] = "text",
        subset: Annotated[str, typer.Option("--subset", help="similar (DAVIS-Edit-S) | changing (-C)")
                          ] = "similar",
        out: Annotated[Path | None, typer.Option("--out", "-o", help="catalog file (default: catalogs/"
                                                 "davis-edit-SUBSET-SETTING.yaml)")] = None,
    ) -> None:
        """Write a catalog with one job per DAVIS-Edit video."""
        target = out or Path("catalogs") / f"davis-edit-{subset}-{setting}.yaml"
        try:
            path = write_davis_edit_catalog(root, target, setting, subset)  # type: ignore[arg-type]
        except DavisEditError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {path}")
