"""How the stack launches JVMs (the same flags as Kafka's own ``kafka-run-class.sh``, minus JMX)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

from guard.stack.errors import StackError

#: What every JVM of the stack runs with, whatever its collector.
BASE_OPTS = [
    "-server",
    "-XX:MaxInlineLevel=15",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]

#: Kafka's own collector settings (`kafka-run-class.sh`): G1 with a 20 ms pause goal. Kafka Connect runs
#: with these; the broker does not (`guard.stack.broker.BROKER_GC_OPTS`).
G1_OPTS = [
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
]

PERF_OPTS = [*BASE_OPTS, *G1_OPTS]


@cache
def java() -> str:
    """Path of a Java >= 17 binary (Kafka 4.x broker and Connect refuse older runtimes)."""
    home = os.environ.get("JAVA_HOME")
    candidate = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not candidate or not Path(candidate).exists():
        raise StackError("java not found; run scripts/setup.sh (installs openjdk-17-jdk-headless).")
    out = subprocess.run([candidate, "-version"], capture_output=True, text=True, check=False).stderr
    m = re.search(r'version "(\d+)', out)
    if not m or int(m.group(1)) < 17:
        raise StackError(f"{candidate} is not Java 17+ ({out.splitlines()[:1]}); set JAVA_HOME to a JDK 17.")
    return candidate


def logging_opts(kafka_version: str, config: Path) -> list[str]:
    """Kafka 4.x logs through log4j2; 3.x through log4j 1 (reload4j)."""
    if kafka_version.startswith("3."):
        return [f"-Dlog4j.configuration=file:{config}"]
    return [f"-Dlog4j2.configurationFile={config}"]


def classpath(lib: Path) -> str:
    return f"{lib}/*"
