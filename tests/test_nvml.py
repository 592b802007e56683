"""Module discovery through NVML (nvswitch_dp.vfio.nvml) against the fake NVML library.

pynvml loads its library once per process and keeps it, so every scenario runs the reader
in a fresh Python subprocess (:func:`_read`) with the fake found through
``LD_LIBRARY_PATH`` or preloaded by path; the pytest process never loads it.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nvml_helpers import (
    FAKE_NVML_ENV,
    H200_GPU_LINE,
    H200_SERIAL,
    H200_UUID,
    LIBRARY_NAME,
    fake_nvml_dir_fixture,  # noqa: F401  (registers the fixture fake_nvml_dir)
    write_fake_nvml,
)

from nvswitch_dp.fabric.platforms import platform
from nvswitch_dp.vfio.identity import SOURCE_NVML

# Reads twice in one process (init/shutdown balanced: the second read works), then checks
# NVML is shut down afterwards. argv[1]: the library to preload, or "" for none.
_RUNNER = """
import dataclasses, json, sys
from pathlib import Path
{prelude}
from nvswitch_dp.vfio.nvml import NvmlUnavailable, read_identities_nvml
library = Path(sys.argv[1]) if sys.argv[1] else None
reads = []
for _ in range(2):
    try:
        reads.append([dataclasses.asdict(gpu) for gpu in read_identities_nvml(library)])
    except NvmlUnavailable as exc:
        reads.append({{"error": str(exc), "chained": exc.__cause__ is not None
                      or not exc.__suppress_context__}})
after = None
if "pynvml" in sys.modules and sys.modules["pynvml"] is not None:
    import pynvml
    try:
        pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        after = str(exc)
print(json.dumps({{"reads": reads, "after": after}}))
"""


@dataclass(frozen=True)
class Outcome:
    """What one subprocess saw: the first read (GPUs or an error) and NVML afterwards."""

    gpus: list[dict[str, Any]] | None
    error: str | None
    after: str | None


def _read(
    tmp_path: Path,
    *,
    lines: list[str] | None,
    library_path: str = "",
    search: Path | None = None,
    prelude: str = "",
) -> Outcome:
    """Run the reader in a subprocess; ``lines`` None leaves the device variable unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", FAKE_NVML_ENV)}
    if lines is not None:
        env[FAKE_NVML_ENV] = str(write_fake_nvml(tmp_path / "gpus.txt", lines))
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    env["LD_LIBRARY_PATH"] = str(search if search is not None else empty)
    result = _run_python(_RUNNER.format(prelude=prelude), library_path, env)
    first, second = result["reads"]
    assert first == second, "a second read in the same process answered differently"
    if isinstance(first, dict):
        assert not first["chained"], "NvmlUnavailable should be raised 'from None'"
        return Outcome(gpus=None, error=first["error"], after=result["after"])
    return Outcome(gpus=first, error=None, after=result["after"])


def _run_python(code: str, argument: str, env: dict[str, str]) -> Any:
    """``code`` in a fresh interpreter (pynvml keeps the first library it loads for the
    life of a process); what it printed, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code, argument],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _gpu(
    address: str, module_id: int | None, uuid: str | None, serial: str | None, minor: int = 0
) -> Any:
    """A GPU as read; ``minor``: its /dev/nvidia<minor> (the fake numbers in file order)."""
    return {
        "address": address,
        "module_id": module_id,
        "uuid": uuid,
        "serial": serial,
        "source": SOURCE_NVML,
        "minor": minor,
        "module_text": None,
    }


H200 = _gpu("0000:00:06.0", 8, H200_UUID, H200_SERIAL)


def test_h200_fixture_gpu_found_on_the_library_path(tmp_path: Path, fake_nvml_dir: Path) -> None:
    outcome = _read(tmp_path, lines=[H200_GPU_LINE], search=fake_nvml_dir)
    assert outcome.gpus == [H200]
    assert outcome.after == "Uninitialized"  # the reader shut NVML down


def test_h200_fixture_gpu_with_the_library_preloaded(tmp_path: Path, fake_nvml_dir: Path) -> None:
    # Nothing on LD_LIBRARY_PATH: pynvml's dlopen("libnvidia-ml.so.1") finds the preloaded
    # object by its SONAME, as with --nvml-library from a container.
    outcome = _read(tmp_path, lines=[H200_GPU_LINE], library_path=str(fake_nvml_dir / LIBRARY_NAME))
    assert outcome.gpus == [H200]


def test_eight_gpus_in_nvml_order_with_sysfs_addresses(tmp_path: Path, fake_nvml_dir: Path) -> None:
    # NVML enumerates by PCI bus; the HGX H200 board's module order differs from it.
    by_address = {address: module for module, address in platform("hgx-h200").module_map().items()}
    lines, expected = [], []
    for index, address in enumerate(sorted(by_address)):
        bus = address.split(":")[1].upper()
        uuid = f"GPU-00000000-1111-2222-3333-44444444440{index}"
        serial = f"165000000000{index}"
        lines.append(f"00000000:{bus}:00.0 {by_address[address]} {uuid} {serial}")
        expected.append(_gpu(address, by_address[address], uuid, serial, index))
    outcome = _read(tmp_path, lines=lines, search=fake_nvml_dir)
    assert outcome.gpus == expected
    assert len(expected) == 8
    assert {gpu["module_id"] for gpu in expected} == set(range(1, 9))


def test_module_id_not_supported_is_none(tmp_path: Path, fake_nvml_dir: Path) -> None:
    lines = [
        H200_GPU_LINE,
        "00000000:00:07.0 - GPU-00000000-1111-2222-3333-555555555555 1650000000002",
        "00000000:00:08.0 3 - -",  # UUID and serial NotSupported: None, not an error
    ]
    outcome = _read(tmp_path, lines=lines, search=fake_nvml_dir)
    assert outcome.gpus == [
        H200,
        _gpu("0000:00:07.0", None, "GPU-00000000-1111-2222-3333-555555555555", "1650000000002", 1),
        _gpu("0000:00:08.0", 3, None, None, 2),
    ]


def test_no_gpus_is_an_empty_answer(tmp_path: Path, fake_nvml_dir: Path) -> None:
    assert _read(tmp_path, lines=[], search=fake_nvml_dir).gpus == []


@pytest.mark.parametrize(
    ("code", "nvml_says"),
    [(9, "Driver Not Loaded"), (4, "Insufficient Permissions"), (999, "Unknown Error")],
)
def test_init_error_names_nvmls_error(
    tmp_path: Path, fake_nvml_dir: Path, code: int, nvml_says: str
) -> None:
    outcome = _read(tmp_path, lines=[H200_GPU_LINE, f"init-error {code}"], search=fake_nvml_dir)
    assert outcome.error == f"nvmlInit failed: {nvml_says}"


def test_no_driver_is_an_init_error(tmp_path: Path, fake_nvml_dir: Path) -> None:
    # The fake answers as NVML does without the kernel driver: DRIVER_NOT_LOADED.
    outcome = _read(tmp_path, lines=None, search=fake_nvml_dir)
    assert outcome.error == "nvmlInit failed: Driver Not Loaded"


def test_no_library_at_all(tmp_path: Path) -> None:
    if ctypes.util.find_library("nvidia-ml") is not None:
        pytest.skip("this machine has a real NVML in the loader's cache")
    outcome = _read(tmp_path, lines=[H200_GPU_LINE])
    assert outcome.error is not None
    assert outcome.error.startswith("NVML library libnvidia-ml.so.1 not found")
    assert "--nvml-library" in outcome.error


def test_preloading_a_missing_library(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / LIBRARY_NAME
    outcome = _read(tmp_path, lines=[H200_GPU_LINE], library_path=str(missing))
    assert outcome.error is not None
    assert outcome.error.startswith(f"NVML library {missing} not found or not loadable: ")


def test_pci_info_error_names_the_device(tmp_path: Path, fake_nvml_dir: Path) -> None:
    lines = [H200_GPU_LINE, "00000000:00:07.0 7 GPU-x 1", "pci-error 1 15"]
    outcome = _read(tmp_path, lines=lines, search=fake_nvml_dir)
    assert outcome.error == "NVML device 1: nvmlDeviceGetPciInfo failed: GPU is lost"
    assert outcome.after == "Uninitialized"  # shut down on the error path too


def test_bus_id_that_is_not_a_pci_address(tmp_path: Path, fake_nvml_dir: Path) -> None:
    outcome = _read(tmp_path, lines=["00000000:00:06.9 8 GPU-x 1"], search=fake_nvml_dir)
    assert outcome.error is not None
    assert outcome.error.startswith("NVML device 0: '00000000:00:06.9' is not a PCI address")


def test_binding_not_installed_names_the_extra(tmp_path: Path, fake_nvml_dir: Path) -> None:
    outcome = _read(
        tmp_path,
        lines=[H200_GPU_LINE],
        search=fake_nvml_dir,
        prelude="sys.modules['pynvml'] = None  # what an absent package looks like",
    )
    assert outcome.error is not None
    assert "pip install 'nvswitch-dp[nvml]'" in outcome.error
    assert "nvidia-ml-py" in outcome.error


_FAKE_CHECK = """
import ctypes, json, sys
import pynvml
lib = ctypes.CDLL(sys.argv[1])
count, size = ctypes.c_uint(), ctypes.c_uint(0)
handle, buffer = ctypes.c_void_p(), ctypes.create_string_buffer(96)
answers = {"before_init": lib.nvmlDeviceGetCount_v2(ctypes.byref(count))}
answers["init"] = lib.nvmlInit_v2()
answers["handle"] = lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle))
answers["bad_index"] = lib.nvmlDeviceGetHandleByIndex_v2(1, ctypes.byref(ctypes.c_void_p()))
answers["uuid_short"] = lib.nvmlDeviceGetUUID(handle, buffer, 40)
answers["uuid_exact"] = lib.nvmlDeviceGetUUID(handle, buffer, 41)
answers["uuid"] = buffer.value.decode()
answers["serial_short"] = lib.nvmlDeviceGetSerial(handle, buffer, 13)
info = pynvml.nvmlPciInfo_t()
answers["pci"] = lib.nvmlDeviceGetPciInfo_v3(handle, ctypes.byref(info))
answers["pci_fields"] = [str(info.busIdLegacy), info.domain, info.bus, info.device,
                         hex(info.pciDeviceId), hex(info.pciSubSystemId), str(info.busId)]
answers["sizes"] = [lib.fakeNvmlPciInfoSize(), ctypes.sizeof(pynvml.nvmlPciInfo_t)]
answers["shutdown"] = lib.nvmlShutdown()
answers["after_shutdown"] = lib.nvmlDeviceGetUUID(handle, buffer, 96)
answers["shutdown_again"] = lib.nvmlShutdown()
print(json.dumps(answers))
"""


def test_fake_follows_the_header(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """The fake itself: return codes, the length argument and pynvml's struct layout."""
    env = dict(os.environ)
    env[FAKE_NVML_ENV] = str(write_fake_nvml(tmp_path / "gpus.txt", [H200_GPU_LINE]))
    answers = _run_python(_FAKE_CHECK, str(fake_nvml_dir / LIBRARY_NAME), env)
    assert answers == {
        "before_init": 1,  # UNINITIALIZED
        "init": 0,
        "handle": 0,
        "bad_index": 2,  # INVALID_ARGUMENT
        "uuid_short": 7,  # INSUFFICIENT_SIZE: 40 characters need 41 bytes
        "uuid_exact": 0,
        "uuid": H200_UUID,
        "serial_short": 7,
        "pci": 0,
        "pci_fields": [
            "0000:00:06.0",
            0,
            0,
            6,
            "0x233510de",
            "0x18bf10de",
            "00000000:00:06.0",
        ],
        "sizes": [68, 68],
        "shutdown": 0,
        "after_shutdown": 1,
        "shutdown_again": 1,
    }
