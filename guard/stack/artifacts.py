"""Fetch Kafka, Kafka Connect and Debezium jars from Maven Central into the cache, once.

Why Maven and not tarballs: Maven Central is the one JVM registry reachable from the project machines,
and ``maven-dependency-plugin`` resolves the exact transitive closure for us. Each target directory is
filled in a temporary sibling and renamed only when Maven succeeded, and a ``.complete`` marker is written
last, so an interrupted download is retried instead of being mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from guard.stack.assets import read_asset
from guard.stack.config import StackConfig
from guard.stack.errors import StackError
from guard.stack.procs import progress, tail

DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
MARKER = ".complete"
#: sha256 of the rendered pom a directory was filled from; a changed pom (e.g. kafka-tools added to the
#: broker's) is fetched again.
POM_STAMP = ".pom.sha256"


@dataclass(frozen=True)
class Artifacts:
    """Where the fetched jars are."""

    broker_lib: Path
    connect_lib: Path
    plugin_path: Path
    #: Debezium's MariaDB connector, a version of its own (3.5.0.Final: 3.6.x is not on Maven Central) in a
    #: plugin directory of its own, so Connect gives it its own class loader and its own Debezium jars.
    mariadb_plugin_path: Path | None = None

    @property
    def plugin_paths(self) -> str:
        """Connect's ``plugin.path``: every plugin root, comma-separated."""
        return ",".join(str(p) for p in (self.plugin_path, self.mariadb_plugin_path) if p is not None)


def _mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("Maven (mvn) is not installed; run scripts/setup.sh (apt-get install maven).")
    return mvn


def _run_mvn(cfg: StackConfig, args: list[str], what: str) -> None:
    log = cfg.logs / "maven.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [_mvn(), "-B", "-q", "-Dstyle.color=never", f"-Dmaven.repo.local={cfg.m2}", *args]
    with open(log, "ab") as out:
        out.write(f"\n===== {what}: {' '.join(cmd)}\n".encode())
        out.flush()
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            check=False).returncode
    if rc != 0:
        raise StackError(
            f"Maven could not fetch {what} (exit {rc}). Check that Maven Central is reachable "
            f"(proxy settings go in ~/.m2/settings.xml) and retry `guard stack up`.\n"
            f"--- last lines of {log} ---\n{tail(log)}"
        )


def _copy_dependencies(cfg: StackConfig, pom_asset: str, version: str, dest: Path, what: str) -> Path:
    """Resolve a throwaway pom's runtime closure into ``dest`` (skipped when complete for this very pom).

    When the pom changed since ``dest`` was filled and the new closure only *adds* jars (the usual case:
    a dependency appended to the pom), the new jars are copied next to the old ones instead of replacing
    the directory, so JVMs of another stack running from this shared cache keep every jar they opened.
    """
    pom_text = read_asset(pom_asset).replace("@VERSION@", version)
    digest = hashlib.sha256(pom_text.encode()).hexdigest()
    stamp = dest / POM_STAMP
    complete = (dest / MARKER).exists()
    if complete and stamp.exists() and stamp.read_text(encoding="utf-8").strip() == digest:
        return dest
    progress(f"fetching {what} with Maven into {dest}"
             + (" (its pom changed)" if complete else " (first run only)"))
    pom = cfg.cache / "poms" / pom_asset
    pom.parent.mkdir(parents=True, exist_ok=True)
    pom.write_text(pom_text, encoding="utf-8")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _run_mvn(cfg, ["-f", str(pom), f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                   f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"], what)
    jars = sorted(p.name for p in tmp.glob("*.jar"))
    if not jars:
        raise StackError(f"Maven reported success for {what} but copied no jars into {tmp}; see maven.log.")
    old = {p.name for p in dest.glob("*.jar")} if complete else set()
    if complete and set(jars) <= old:
        # an older pom (another branch's stack on this shared cache): every jar it needs is there already;
        # the extra ones (e.g. connect-basic-auth-extension) are inert unless configured, so keep them
        # rather than pull jars from under the JVMs of the stack that added them
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    if complete and old <= set(jars):
        added = [j for j in jars if j not in old]
        for name in added:
            shutil.copy2(tmp / name, dest / f".{name}.partial")
            (dest / f".{name}.partial").rename(dest / name)
        (dest / MARKER).write_text("\n".join(jars) + "\n", encoding="utf-8")
        stamp.write_text(digest + "\n", encoding="utf-8")
        shutil.rmtree(tmp, ignore_errors=True)
        if added:
            progress(f"added {len(added)} jars to {dest} ({', '.join(added[:4])}{', ...' if len(added) > 4 else ''})")
        return dest
    (tmp / MARKER).write_text("\n".join(jars) + "\n", encoding="utf-8")
    (tmp / POM_STAMP).write_text(digest + "\n", encoding="utf-8")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    return dest


def _debezium_plugin(cfg: StackConfig, plugin_path: Path, engine: str, version: str, what: str) -> None:
    """Debezium's published plugin archive of ``debezium-connector-<engine>``; falls back to copy-dependencies
    (``assets/debezium-<engine>-pom.xml``) if it is missing."""
    artifact = f"debezium-connector-{engine}"
    dest = plugin_path / artifact
    if (dest / MARKER).exists():
        return
    progress(f"fetching Debezium {version} {what} connector plugin (first run only)")
    downloads = cfg.cache / "downloads"
    archive = downloads / f"{artifact}-{version}-plugin.tar.gz"
    try:
        if not archive.exists():
            _run_mvn(cfg, [f"{DEPENDENCY_PLUGIN}:copy",
                           f"-Dartifact=io.debezium:{artifact}:{version}:tar.gz:plugin",
                           f"-DoutputDirectory={downloads}"], f"the Debezium {what} plugin archive")
        tmp = plugin_path / ".extract.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        extracted = tmp / artifact
        if not any(extracted.glob(f"{artifact}-*.jar")):
            raise StackError(f"unexpected layout in {archive}")
        (extracted / MARKER).write_text("plugin archive\n", encoding="utf-8")
        shutil.rmtree(dest, ignore_errors=True)
        extracted.rename(dest)
        shutil.rmtree(tmp, ignore_errors=True)
    except StackError as exc:
        progress(f"plugin archive unusable ({str(exc).splitlines()[0]}); falling back to copy-dependencies")
        _copy_dependencies(cfg, f"debezium-{engine}-pom.xml", version, dest, f"the Debezium {what} connector jars")


def ensure_artifacts(cfg: StackConfig) -> Artifacts:
    """Make sure every jar the stack needs is in the cache; download what is missing."""
    kv, cv = cfg.kafka_version, cfg.connect_version
    broker_pom = "broker-pom-3x.xml" if kv.startswith("3.") else "broker-pom.xml"
    broker_lib = _copy_dependencies(cfg, broker_pom, kv, cfg.cache / f"kafka-{kv}" / "broker",
                                    f"the Kafka {kv} broker jars")
    connect_lib = _copy_dependencies(cfg, "connect-pom.xml", cv, cfg.cache / f"kafka-{cv}" / "connect",
                                     f"the Kafka Connect {cv} worker jars")
    plugin_path = cfg.cache / f"debezium-{cfg.debezium_version}" / "plugins"
    _debezium_plugin(cfg, plugin_path, "postgres", cfg.debezium_version, "PostgreSQL")
    # its own root: Debezium 3.5.0's core jars must not sit beside 3.6.1's in one class loader
    mariadb_plugin_path = cfg.cache / f"debezium-{cfg.mariadb_debezium_version}" / "plugins"
    _debezium_plugin(cfg, mariadb_plugin_path, "mariadb", cfg.mariadb_debezium_version, "MariaDB")
    return Artifacts(broker_lib=broker_lib, connect_lib=connect_lib, plugin_path=plugin_path,
                     mariadb_plugin_path=mariadb_plugin_path)
