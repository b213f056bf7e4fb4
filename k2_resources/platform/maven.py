"""Jars from Maven Central: a pom's runtime classpath, resolved by Maven once and cached.

The embedded Kafka broker, Spark's Iceberg runtime and the Kafka Connect peer each ship their
jars this way (no download tool of our own; Maven's local repository is the cache of the jars).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from k2_resources.errors import K2Error


def maven_classpath(pom: Path, cached: Path, what: str, error: type[Exception] = K2Error) -> str:
    """The runtime classpath of ``pom`` (``os.pathsep``-joined jar paths), from ``cached`` while it
    is newer than the pom, else resolved by Maven into it. Failures raise ``error`` naming ``what``
    was being fetched and the fix."""
    if cached.exists() and cached.stat().st_mtime >= pom.stat().st_mtime and cached.read_text().strip():
        return cached.read_text().strip()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise error(
            f"`mvn` was not found on PATH; install Maven (Debian: `apt-get install maven`) so K2 can fetch {what}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:build-classpath",
            f"-Dmdep.outputFile={cached}",
            "-Dmdep.includeScope=runtime",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not cached.exists():
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise error(
            f"Maven could not resolve {what} from {pom}; check access to Maven Central (or a mirror "
            "in ~/.m2/settings.xml):\n" + "\n".join(tail)
        )
    return cached.read_text().strip()
