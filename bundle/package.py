"""Build the downloadable MONAI Model Zoo style zip of this bundle.

    python -m bundle.package [--output dist] [--weights models/model.pt --weights-url URL]

writes ``<output>/pathology_mpamatch_segmentation_v<version>.zip`` (version from ``configs/metadata.json``) with one
top folder ``pathology_mpamatch_segmentation/``: ``configs/`` (every JSON file and ``logging.conf``), ``bundle/``
(the package's ``.py`` files), ``docs/``, ``LICENSE``, ``README.md``, ``models/README.md``, and ``setup.cfg`` with
``pyproject.toml`` (so that ``pip install -e .`` in the downloaded folder installs the dependencies).

Weights never go into the zip: with ``--weights`` and ``--weights-url`` the zip gets a ``large_files.yml`` listing
``models/model.pt`` with its URL and SHA-256, which ``python -m monai.bundle download_large_files`` downloads and
checks. Entries are sorted and carry a fixed timestamp and mode, so the same sources always give the same bytes.
Problems with the input are reported as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

from bundle.errors import BundleInputError

__all__ = [
    "BUNDLE_NAME",
    "HASH_TYPE",
    "LARGE_FILES_NAME",
    "WEIGHTS_PATH",
    "build_package",
    "build_parser",
    "bundle_version",
    "file_hash",
    "large_files_text",
    "main",
    "package_members",
]

BUNDLE_NAME = "pathology_mpamatch_segmentation"
LARGE_FILES_NAME = "large_files.yml"
WEIGHTS_PATH = "models/model.pt"
HASH_TYPE = "sha256"  # one of the hash types MONAI's download_url checks (md5, sha1, sha256, sha512)

REPO_ROOT = Path(__file__).resolve().parents[1]
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry: builds do not depend on mtimes
_FILE_MODE = 0o100644  # regular file, rw-r--r--
_WEIGHT_SUFFIXES = {".pt", ".pth", ".ts", ".onnx", ".bin", ".ckpt", ".safetensors"}
_URL_SCHEMES = {"http", "https", "file"}


def _is_packaged(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    hidden_or_cache = any(part.startswith(".") or part == "__pycache__" for part in parts)
    return path.is_file() and not hidden_or_cache and path.suffix.lower() not in _WEIGHT_SUFFIXES


def bundle_version(root: str | os.PathLike = REPO_ROOT) -> str:
    """The ``version`` of ``<root>/configs/metadata.json``."""
    meta_file = Path(root) / "configs" / "metadata.json"
    try:
        metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BundleInputError(f"cannot read the bundle metadata {meta_file}: {error}") from error
    version = metadata.get("version") if isinstance(metadata, dict) else None
    if not isinstance(version, str) or not version.strip():
        raise BundleInputError(f'{meta_file} has no "version" string')
    return version.strip()


def package_members(root: str | os.PathLike = REPO_ROOT) -> dict[str, Path]:
    """Archive path (relative to the bundle's top folder, ``/``-separated) -> source file, sorted by archive path."""
    root = Path(root).resolve()
    members: dict[str, Path] = {}
    for required in ("LICENSE", "README.md", "configs/metadata.json", "configs/logging.conf"):
        if not (root / required).is_file():
            raise BundleInputError(f"{root / required} is missing: the bundle zip needs it")
    candidates = [root / name for name in ("LICENSE", "README.md", "setup.cfg", "pyproject.toml")]
    candidates += [root / "configs" / "logging.conf", root / "models" / "README.md"]
    candidates += sorted((root / "configs").glob("*.json"))
    candidates += sorted((root / "bundle").rglob("*.py"))
    candidates += sorted((root / "docs").rglob("*")) if (root / "docs").is_dir() else []
    for path in candidates:
        if path.exists() and _is_packaged(path, root):
            members[path.relative_to(root).as_posix()] = path
    return dict(sorted(members.items()))


def file_hash(path: str | os.PathLike, hash_type: str = HASH_TYPE) -> str:
    """Hex digest of ``path`` (read in 1 MiB chunks)."""
    digest = hashlib.new(hash_type)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def large_files_text(url: str, hash_val: str, hash_type: str = HASH_TYPE, path: str = WEIGHTS_PATH) -> str:
    """``large_files.yml`` listing one file, in the Model Zoo's format (values quoted as JSON strings)."""
    return (
        "large_files:\n"
        f"  - path: {json.dumps(path)}\n"
        f"    url: {json.dumps(url)}\n"
        f"    hash_val: {json.dumps(hash_val)}\n"
        f"    hash_type: {json.dumps(hash_type)}\n"
    )


def _check_weights(weights: Path) -> None:
    """``weights`` must be a plain state dict (name -> tensor) that ``torch.load(weights_only=True)`` reads."""
    import torch

    if not weights.is_file():
        raise BundleInputError(f"--weights {weights} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to read the file is a problem with the given file
        raise BundleInputError(f"--weights {weights} cannot be read as a PyTorch state dict: {error}") from error
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(sorted(map(str, state))[:5]) if isinstance(state, Mapping) else type(state).__name__
        raise BundleInputError(
            f"--weights {weights} is not a plain state dict of network_def (found: {keys}); "
            "publish models/model.pt as written by training"
        )


def _check_url(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in _URL_SCHEMES or not (parsed.netloc or parsed.path):
        raise BundleInputError(f"--weights-url {url!r} is not an http(s):// or file:// URL")


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, so that the mode below is read the same everywhere
    info.external_attr = _FILE_MODE << 16
    return info


def build_package(
    output_dir: str | os.PathLike = "dist",
    weights: str | os.PathLike | None = None,
    weights_url: str | None = None,
    root: str | os.PathLike = REPO_ROOT,
) -> Path:
    """Write the bundle zip into ``output_dir`` and return its path.

    ``weights`` and ``weights_url`` go together: the weights file is hashed (SHA-256) and listed with the URL in
    ``large_files.yml``; it is not put into the zip. Without them the zip has no ``large_files.yml``.
    """
    if (weights is None) != (weights_url is None):
        raise BundleInputError("--weights and --weights-url go together: give both (the file to hash, its URL) or none")
    root = Path(root).resolve()
    version = bundle_version(root)
    members = package_members(root)
    extra: dict[str, bytes] = {}
    if weights is not None and weights_url is not None:
        weights = Path(weights).expanduser().resolve()
        _check_weights(weights)
        _check_url(weights_url)
        extra[LARGE_FILES_NAME] = large_files_text(weights_url, file_hash(weights)).encode("utf-8")

    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    zip_path = output_dir / f"{BUNDLE_NAME}_v{version}.zip"
    entries = {name: path.read_bytes() for name, path in members.items()}
    entries.update(extra)
    with tempfile.NamedTemporaryFile(dir=output_dir, prefix=f".{zip_path.name}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with zipfile.ZipFile(tmp_path, "w") as archive:
            for name in sorted(entries):
                archive.writestr(_zip_entry(f"{BUNDLE_NAME}/{name}"), entries[name], compresslevel=9)
        os.replace(tmp_path, zip_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return zip_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bundle.package",
        description=f"Build {BUNDLE_NAME}_v<version>.zip, the bundle as `python -m monai.bundle download` fetches it.",
    )
    parser.add_argument("--output", default="dist", help="folder to write the zip to (default: dist)")
    parser.add_argument("--weights", help=f"trained weights to publish ({WEIGHTS_PATH}); hashed, never zipped")
    parser.add_argument("--weights-url", help="URL the weights are downloaded from (http(s):// or file://)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; print the zip path and return 0, or print one ``error:`` line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        zip_path = build_package(args.output, weights=args.weights, weights_url=args.weights_url)
    except BundleInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(zip_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
