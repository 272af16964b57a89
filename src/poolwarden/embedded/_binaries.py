"""Finding PostgreSQL's server programs, and running them as the right OS user.

PostgreSQL refuses to run as root: when this process is root, the :class:`Runner` runs the
server and its tools as the ``postgres`` OS user and hands every directory they use to it.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ._helpers import EmbeddedError

__all__ = ["INSTALL_HINT", "PgBinaries", "Runner", "find_binaries"]

INSTALL_HINT = "install the server with `apt-get install postgresql` (Debian/Ubuntu)"


@dataclass(frozen=True, slots=True)
class PgBinaries:
    """Where one PostgreSQL installation keeps its server programs, and its major version."""

    bindir: Path
    major: int

    def tool(self, name: str) -> str:
        """Absolute path of the program ``name`` (``pg_ctl``, ``initdb``, ``psql``, ...)."""
        return str(self.bindir / name)


def find_binaries(search_root: Path = Path("/usr/lib/postgresql")) -> PgBinaries:
    """Locate PostgreSQL's server programs.

    Looks at ``$POOLWARDEN_PG_BIN``, then ``PATH`` (a directory with ``pg_ctl``, ``initdb`` and
    ``postgres``), then the newest ``<search_root>/<version>/bin`` (Debian's layout).

    Raises :class:`EmbeddedError`, saying how to install PostgreSQL, when none is found.
    """
    candidates: list[Path] = []
    if env_bin := os.environ.get("POOLWARDEN_PG_BIN"):
        candidates.append(Path(env_bin))
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).resolve().parent)
    versioned = search_root.glob("*/bin")
    candidates.extend(sorted(versioned, key=_version_key, reverse=True))
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("pg_ctl", "initdb", "postgres")):
            return PgBinaries(bindir=bindir, major=_major_version(bindir))
    raise EmbeddedError(f"no PostgreSQL server programs (pg_ctl, initdb) found; {INSTALL_HINT}")


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def _major_version(bindir: Path) -> int:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"(\d+)", out)
    if match is None:
        raise EmbeddedError(f"cannot read the PostgreSQL version from {out!r}")
    return int(match.group(1))


class Runner:
    """Runs PostgreSQL programs as the right OS user and hands directories to that user."""

    def __init__(self, binaries: PgBinaries) -> None:
        self.binaries = binaries
        self.as_root = os.geteuid() == 0
        self.uid = os.getuid()
        self.gid = os.getgid()
        if self.as_root:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise EmbeddedError(
                    "running as root but there is no 'postgres' OS user to run the server as; "
                    + INSTALL_HINT
                ) from None
            self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def run(
        self, tool: str, *args: str, cwd: Path, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``tool`` from the server's bin directory; raise :class:`EmbeddedError` on failure."""
        command = [self.binaries.tool(tool), *args]
        drop: dict[str, object] = {}
        if self.as_root:
            drop = {"user": self.uid, "group": self.gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "PGAPPNAME": "poolwarden-embedded"}
        env.pop("PGPASSWORD", None)
        result = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            **drop,  # type: ignore[call-overload]
        )
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise EmbeddedError(f"{tool} {' '.join(args[:1])} failed: {detail}")
        return result  # type: ignore[no-any-return]

    def own(self, path: Path) -> None:
        """Give ``path`` (recursively) to the server's OS user."""
        if not self.as_root:
            return
        os.chown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), self.uid, self.gid)
