"""Building the C fakes of NVIDIA's libraries (``tests/fakes/*.c``) with the machine's gcc."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def compile_shared_library(source: Path, output: Path, *, soname: str | None = None) -> Path:
    """``gcc -shared`` of ``source`` into ``output``, warnings as errors; returns ``output``.

    A machine without gcc fails here with the package to install, never skips.
    """
    gcc = shutil.which("gcc")
    assert gcc is not None, f"gcc is needed to build {source.name} (apt-get install gcc)"
    flags = ["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror"]
    if soname is not None:
        flags.append(f"-Wl,-soname,{soname}")
    subprocess.run([gcc, *flags, "-o", str(output), str(source)], check=True)
    return output
