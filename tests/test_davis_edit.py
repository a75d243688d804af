"""DAVIS-Edit catalogs from a miniature DAVIS-Edit tree built here (frames, palette masks, references,
caption files, and the stray Thumbs.db / .DS_Store files real copies carry)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.config.davis_edit import DavisEditError, davis_edit_jobs, register, write_davis_edit_catalog

CAPTIONS = {
    "text": {"bear": {"original": "a bear walking on rocks", "similar": "a panda walking on rocks",
                      "changing": "a rabbit walking on rocks"},
             "car-turn": {"original": "a car turning", "similar": "a jeep turning",
                          "changing": "a bus turning"}},
    "image": {"bear": {"original": "a bear", "similar": "a brown panda", "changing": "a white rabbit"},
              "car-turn": {"original": "a car", "similar": "a red jeep", "changing": "a yellow bus"}},
}


def _palette_mask(path: Path, box: tuple[int, int, int, int]) -> None:
    ids = np.zeros((24, 32), np.uint8)
    y0, y1, x0, x1 = box
    ids[y0:y1, x0:x1] = 1
    im = Image.fromarray(ids, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # DAVIS: object 1 = dark red
    im.save(path)


def _tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for video in ("bear", "car-turn"):
        frames, masks = root / "JPEGImages" / "480p" / video, root / "Annotations" / "480p" / video
        frames.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(frames / f"{i:05d}.jpg")
            _palette_mask(masks / f"{i:05d}.png", (4 + i, 16 + i, 6, 20))
        (frames / "Thumbs.db").write_bytes(b"\x00junk")
        (masks / ".DS_Store").write_bytes(b"\x00junk")
    (root / "JPEGImages" / "480p" / "Thumbs.db").write_bytes(b"\x00junk")
    (root / "JPEGImages" / "480p" / ".DS_Store").write_bytes(b"\x00junk")
    (root / "JPEGImages" / "480p" / "nothing-here").mkdir()  # only a Thumbs.db: no frames
    (root / "JPEGImages" / "480p" / "nothing-here" / "Thumbs.db").write_bytes(b"\x00")
    for subset in ("similar", "changing"):
        refs = root / "ReferenceImages" / subset
        refs.mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(refs / "bear.png")
        (refs / ".DS_Store").write_bytes(b"\x00")
    car = np.full((40, 40, 3), 90, np.uint8)
    Image.fromarray(car).save(root / "ReferenceImages" / "similar" / "car-turn.png")  # no 'changing' one
    for setting, caps in CAPTIONS.items():
        (root / f"edited_video_caption_dict_{setting}.json").write_text(json.dumps(caps))
    return root


def test_text_catalog_validates_and_ingests(tmp_path: Path) -> None:
    from flows.config.catalog import load_catalog
    from stages.ingest import IngestParams, read_source

    root = _tree(tmp_path / "DAVIS-Edit")
    path = write_davis_edit_catalog(root, tmp_path / "catalogs" / "s-text.yaml", "text", "similar")
    catalog = load_catalog(path)
    assert not catalog.errors, catalog.errors
    jobs = {j.id: j for j in catalog.jobs}
    assert set(jobs) == {"bear-text-similar", "car-turn-text-similar"}
    bear = jobs["bear-text-similar"]
    assert bear.mode == "inpaint" and bear.prompt == "a panda walking on rocks" and bear.seed == 42
    assert bear.source == (root / "JPEGImages" / "480p" / "bear").resolve()
    # The palette masks and the stray files go through ingest: object id 1 -> True.
    clip = read_source(bear.source, IngestParams(n_frames=3, width=64, height=64), masks=bear.masks)
    assert clip.frames.shape == (3, 24, 32, 3) and clip.masks is not None
    assert clip.masks[2].sum() == 12 * 14 and clip.masks[2][6:18, 6:20].all()


def test_image_catalog_uses_reference_images_and_skips_what_is_missing(tmp_path: Path) -> None:
    from flows.config.catalog import load_catalog

    root = _tree(tmp_path / "DAVIS-Edit")
    jobs, skipped = davis_edit_jobs(root, "image", "changing", tmp_path)
    assert [j["id"] for j in jobs] == ["bear-image-changing"]
    assert "car-turn" in skipped and "reference" in skipped["car-turn"]
    assert "nothing-here" in skipped and "no frames" in skipped["nothing-here"]
    path = write_davis_edit_catalog(root, tmp_path / "c-image.yaml", "image", "changing")
    (job,) = load_catalog(path).jobs
    assert job.mode == "reference" and job.prompt == "a white rabbit"
    assert job.reference == (root / "ReferenceImages" / "changing" / "bear.png").resolve()


def test_clear_errors_for_a_wrong_tree(tmp_path: Path) -> None:
    with pytest.raises(DavisEditError, match="JPEGImages"):
        write_davis_edit_catalog(tmp_path, tmp_path / "x.yaml")
    root = _tree(tmp_path / "DAVIS-Edit")
    (root / "edited_video_caption_dict_text.json").unlink()
    with pytest.raises(DavisEditError, match="edited_video_caption_dict_text.json"):
        write_davis_edit_catalog(root, tmp_path / "x.yaml", "text", "similar")
    with pytest.raises(DavisEditError, match="subset"):
        write_davis_edit_catalog(root, tmp_path / "x.yaml", "image", "other")  # type: ignore[arg-type]


def test_cli_command(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    root = _tree(tmp_path / "DAVIS-Edit")
    app = typer.Typer()
    register(app)
    out = tmp_path / "cat.yaml"
    res = CliRunner().invoke(app, ["catalog", "davis-edit", str(root), "--setting", "image", "--subset",
                                   "similar", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "car-turn-image-similar" in out.read_text()
    bad = CliRunner().invoke(app, ["catalog", "davis-edit", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no such folder" in bad.output
