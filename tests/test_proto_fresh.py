"""The committed betterproto2 code in ``nvswitch_dp/proto`` matches a fresh generation.

Fails when someone edits ``proto/`` (or a generated file) without running
``.venv/bin/python tools/gen_proto.py``; the message lists the differing files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_gen_proto() -> ModuleType:
    """``tools/gen_proto.py`` as a module (``tools`` is not a package)."""
    path = REPO_ROOT / "tools" / "gen_proto.py"
    spec = importlib.util.spec_from_file_location("gen_proto", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_is_fresh(tmp_path: Path) -> None:
    gen_proto = load_gen_proto()
    fresh = tmp_path / "proto"
    gen_proto.generate(fresh)
    committed: dict[str, bytes] = gen_proto.generated_files(gen_proto.GENERATED_PACKAGE_DIR)
    generated: dict[str, bytes] = gen_proto.generated_files(fresh)
    stale = gen_proto.differences(gen_proto.GENERATED_PACKAGE_DIR, fresh)
    assert not stale, "run `.venv/bin/python tools/gen_proto.py`: " + "; ".join(stale)
    assert committed == generated  # byte for byte
    assert {
        "v1beta1/__init__.py",
        "v1/__init__.py",
        "pluginregistration/__init__.py",
        "k8s/io/kubelet/pkg/apis/dra/v1/__init__.py",
        "k8s/io/kubelet/pkg/apis/dra/v1beta1/__init__.py",
    } <= committed.keys()
