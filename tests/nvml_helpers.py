"""The fake NVML library (``tests/fakes/libnvml_fake.c``), built once per session.

Use from a test module by importing the fixture function (pytest finds fixtures among a
module's globals); it registers the fixture ``fake_nvml_dir``, which tests then take as a
parameter. The function has another name so the parameter does not shadow the import (ruff
F811)::

    from nvml_helpers import fake_nvml_dir_fixture, write_fake_nvml  # noqa: F401

    def test_something(tmp_path: Path, fake_nvml_dir: Path) -> None: ...

``fake_nvml_dir`` is a directory holding ``libnvidia-ml.so.1`` (SONAME
``libnvidia-ml.so.1``): put it on ``LD_LIBRARY_PATH`` or pass the file as
``read_identities_nvml(library=...)``. The GPUs come from the file named by
:data:`FAKE_NVML_ENV`; :func:`write_fake_nvml` writes one. pynvml keeps the first library it
loads for the life of the process, so load the fake only in a subprocess, never in the
pytest process itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from c_helpers import compile_shared_library

FAKE_SOURCE = Path(__file__).parent / "fakes" / "libnvml_fake.c"
FAKE_NVML_ENV = "NVSWITCH_DP_FAKE_NVML"
LIBRARY_NAME = "libnvidia-ml.so.1"

# The H200 SXM of shared/reference/hardware/h200-sxm-passthrough (nvidia-smi-q.txt): its
# bus ID as NVML prints it, its module ID, and the placeholder UUID and serial.
H200_BUS_ID = "00000000:00:06.0"
H200_MODULE_ID = 8
H200_UUID = "GPU-00000000-1111-2222-3333-444444444444"
H200_SERIAL = "1650000000001"
H200_GPU_LINE = f"{H200_BUS_ID} {H200_MODULE_ID} {H200_UUID} {H200_SERIAL}"


@pytest.fixture(scope="session", name="fake_nvml_dir")
def fake_nvml_dir_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the fake ``libnvidia-ml.so.1``, compiled once per session."""
    directory = tmp_path_factory.mktemp("libnvml")
    compile_shared_library(FAKE_SOURCE, directory / LIBRARY_NAME, soname=LIBRARY_NAME)
    return directory


def write_fake_nvml(path: Path, lines: Iterable[str]) -> Path:
    """Write the fake's device file (format in ``libnvml_fake.c``); returns ``path``.

    Each line is ``<busId> <moduleId|-> <uuid|-> <serial|->``, ``init-error <code>`` or
    ``pci-error <index> <code>`` (after the GPU it names).
    """
    path.write_text("".join(line + "\n" for line in lines))
    return path
