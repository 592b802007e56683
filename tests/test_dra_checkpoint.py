"""The prepared-claims checkpoint: round trips, refusals, and a writer killed mid-save."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvswitch_dp.dra.checkpoint import (
    CHECKPOINT_VERSION,
    Checkpoint,
    CheckpointError,
    PreparedClaim,
)
from nvswitch_dp.dra.uid import InvalidClaimUid

UID = "3f2a9c1e-0b7d-4c55-9e21-6a8f0d4b7c10"
UID2 = "0c1d2e3f-4a5b-4c6d-8e7f-901234567890"


def claim(uid: str = UID, partition_id: int = 4) -> PreparedClaim:
    return PreparedClaim(
        uid=uid,
        namespace="default",
        name="vm-4x-gpus",
        partition_id=partition_id,
        devices=(
            (("gpu0",), "gpu-5"),
            (("gpu1",), "gpu-6"),
            (("gpu2", "gpu3"), "gpu-7"),
        ),
        cdi_ids=(f"nvswitch-dp.io/partition={uid}",),
    )


def test_missing_file_is_an_empty_checkpoint(tmp_path: Path) -> None:
    assert Checkpoint(tmp_path / "absent" / "cp.json").load() == {}


def test_round_trip(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "state" / "dra-checkpoint.json")  # directory created
    claims = {UID: claim(UID, 4), UID2: claim(UID2, 9)}
    cp.save(claims)
    assert cp.load() == claims
    cp.save({UID2: claims[UID2]})
    assert cp.load() == {UID2: claims[UID2]}
    cp.save({})
    assert cp.load() == {}
    assert os.listdir(tmp_path / "state") == ["dra-checkpoint.json"]


def test_file_format(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "cp.json")
    cp.save({UID: claim()})
    document = json.loads(cp.path.read_text())
    assert document["version"] == CHECKPOINT_VERSION == 1
    assert document["checksum"].startswith("sha256:")
    assert document["claims"][UID] == {
        "uid": UID,
        "namespace": "default",
        "name": "vm-4x-gpus",
        "partitionID": 4,
        "devices": [
            {"requests": ["gpu0"], "device": "gpu-5"},
            {"requests": ["gpu1"], "device": "gpu-6"},
            {"requests": ["gpu2", "gpu3"], "device": "gpu-7"},
        ],
        "cdiIDs": [f"nvswitch-dp.io/partition={UID}"],
    }


names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12)
prepared = st.builds(
    PreparedClaim,
    uid=st.uuids().map(str),
    namespace=names,
    name=names,
    partition_id=st.integers(0, 2**31),
    devices=st.lists(st.tuples(st.lists(names, max_size=3).map(tuple), names), max_size=4).map(
        tuple
    ),
    cdi_ids=st.lists(names, max_size=2).map(tuple),
)


@given(st.lists(prepared, max_size=5))
def test_any_claims_round_trip(claims: list[PreparedClaim]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        cp = Checkpoint(Path(directory) / "cp.json")
        by_uid = {c.uid: c for c in claims}
        cp.save(by_uid)
        assert cp.load() == by_uid


def test_save_refuses_a_key_that_is_not_the_uid(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "cp.json")
    with pytest.raises(ValueError, match="not the claim's UID"):
        cp.save({UID2: claim(UID)})
    assert not cp.path.exists()


def test_a_prepared_claim_needs_a_valid_uid() -> None:
    with pytest.raises(InvalidClaimUid):
        claim("../x")


# --------------------------------------------------------------- refusals


def _saved(tmp_path: Path) -> tuple[Checkpoint, dict[str, Any]]:
    cp = Checkpoint(tmp_path / "cp.json")
    cp.save({UID: claim()})
    return cp, json.loads(cp.path.read_text())


def _rewrite(cp: Checkpoint, document: Any, *, fix_checksum: bool = True) -> None:
    # Re-sealed with a checksum computed as the daemon does, so the field checks are
    # reached rather than the checksum's.
    if fix_checksum and isinstance(document.get("claims"), dict) and "checksum" in document:
        canonical = json.dumps(document["claims"], sort_keys=True, separators=(",", ":"))
        document["checksum"] = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    cp.path.write_text(json.dumps(document))


def test_corrupt_json_is_refused_with_the_file_named(tmp_path: Path) -> None:
    cp, _ = _saved(tmp_path)
    text = cp.path.read_text()
    cp.path.write_text(text[: len(text) // 2])  # a torn file, as no save of ours leaves
    with pytest.raises(CheckpointError) as caught:
        cp.load()
    assert caught.value.path == cp.path
    assert "not valid JSON" in caught.value.problem
    assert str(cp.path) in str(caught.value) and "will not start" in str(caught.value)
    cp.path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        cp.load()


def test_another_version_is_refused(tmp_path: Path) -> None:
    cp, document = _saved(tmp_path)
    document["version"] = 2
    _rewrite(cp, document)
    with pytest.raises(CheckpointError, match="version 2, but this daemon reads version 1"):
        cp.load()
    document["version"] = "1"
    _rewrite(cp, document)
    with pytest.raises(CheckpointError, match="no version number"):
        cp.load()


def test_a_changed_file_fails_its_checksum(tmp_path: Path) -> None:
    cp, document = _saved(tmp_path)
    document["claims"][UID]["partitionID"] = 5
    _rewrite(cp, document, fix_checksum=False)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        cp.load()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("checksum"), "expected checksum, claims and version"),
        (lambda d: d.update(extra=1), "expected checksum, claims and version"),
        (lambda d: d.update(claims=[]), "claims is not an object"),
        (lambda d: d["claims"][UID].pop("cdiIDs"), "fields"),
        (lambda d: d["claims"][UID].update(pool="node-a"), "fields"),
        (lambda d: d["claims"][UID].update(uid=UID2), "recorded under another UID"),
        (lambda d: d["claims"][UID].update(partitionID=True), "partitionID True"),
        (lambda d: d["claims"][UID].update(partitionID=-1), "partitionID -1"),
        (lambda d: d["claims"][UID].update(name=""), "name '' is not"),
        (lambda d: d["claims"][UID].update(devices={}), "devices is not a list"),
        (lambda d: d["claims"][UID].update(devices=[["gpu0", "gpu-5"]]), "is not {requests"),
        (
            lambda d: d["claims"][UID].update(devices=[{"requests": "gpu0", "device": "x"}]),
            "not a list of strings",
        ),
        (lambda d: d["claims"][UID].update(cdiIDs=[1]), "cdiIDs"),
        (lambda d: d.update(claims={"x": {**d["claims"][UID], "uid": "x"}}), "lower-case UUID"),
    ],
)
def test_malformed_entries_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    cp, document = _saved(tmp_path)
    change(document)
    _rewrite(cp, document)
    with pytest.raises(CheckpointError, match=message):
        cp.load()


def test_not_an_object_is_refused(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "cp.json")
    cp.path.write_text("[]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        cp.load()


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    cp, _ = _saved(tmp_path)
    before = cp.path.read_bytes()
    blocked = Checkpoint(tmp_path / "dir-in-the-way")
    (tmp_path / "dir-in-the-way").mkdir()
    (tmp_path / "dir-in-the-way" / "x").write_text("")
    with pytest.raises(OSError):
        blocked.save({UID: claim()})
    assert cp.path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cp.json", "dir-in-the-way"]


# --------------------------------------------------------------- SIGKILL mid-save

# The writer: saves the "old" checkpoint, then starts saving the "new" one. With a
# stage named, it stops inside save() at that point (a real process, blocked in the
# middle of the real code path) and tells the test, which SIGKILLs it; with "loop" it
# alternates old and new as fast as it can until it is killed at a random moment.
WRITER = textwrap.dedent(
    """
    import os, sys, time
    from nvswitch_dp.dra.checkpoint import Checkpoint, PreparedClaim

    path, stage, count = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def claims(partition):
        out = {}
        for i in range(count):
            uid = "%08x-0000-4000-8000-%012x" % (partition, i)
            out[uid] = PreparedClaim(uid, "ns", "claim-%d" % i, partition,
                                     ((("gpu0",), "gpu-1"),), ("nvswitch-dp.io/partition=" + uid,))
        return out

    def block():
        print("blocked", flush=True)
        while True:
            time.sleep(60)

    cp = Checkpoint(path)
    cp.save(claims(1))
    if stage == "loop":
        print("looping", flush=True)
        n = 0
        while True:
            n += 1
            cp.save(claims(2 if n % 2 else 1))
    real_write, real_replace, real_fsync = os.write, os.replace, os.fsync
    if stage == "mid-write":
        def write(fd, data):
            real_write(fd, bytes(data[: len(data) // 2]))
            block()
        os.write = write
    elif stage == "before-rename":
        os.replace = lambda *a: block()
    elif stage == "before-directory-fsync":
        calls = []
        def fsync(fd):
            calls.append(fd)
            if len(calls) == 2:   # the first is the file's, the second the directory's
                block()
            real_fsync(fd)
        os.fsync = fsync
    cp.save(claims(2))
    print("saved", flush=True)
    """
)


def _run_writer(path: Path, stage: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), stage, str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert process.stdout is not None
    process.stdout.close()


def _partitions(claims: dict[str, PreparedClaim]) -> set[int]:
    return {c.partition_id for c in claims.values()}


@pytest.mark.parametrize(
    ("stage", "expected"),
    [("mid-write", 1), ("before-rename", 1), ("before-directory-fsync", 2)],
)
def test_sigkill_inside_save_leaves_old_or_new(tmp_path: Path, stage: str, expected: int) -> None:
    path = tmp_path / "dra-checkpoint.json"
    writer = _run_writer(path, stage, 50)
    assert writer.stdout is not None
    assert writer.stdout.readline() == "blocked\n"
    _kill(writer)
    if stage != "before-directory-fsync":
        # The killed writer's temporary file is still there, and never read as the file.
        assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    loaded = Checkpoint(path).load()
    assert len(loaded) == 50
    assert _partitions(loaded) == {expected}
    assert os.listdir(tmp_path) == [path.name]  # load() swept the leftover


def test_sigkill_at_random_moments_never_tears_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dra-checkpoint.json"
    rng = random.Random(5)
    seen: set[int] = set()
    for _ in range(8):
        writer = _run_writer(path, "loop", 400)  # ~100 kB per save
        assert writer.stdout is not None
        assert writer.stdout.readline() == "looping\n"
        # The moment varies on purpose; nothing is asserted about time.
        time.sleep(rng.uniform(0, 0.05))
        _kill(writer)
        loaded = Checkpoint(path).load()
        assert len(loaded) == 400
        (partition,) = _partitions(loaded)
        seen.add(partition)
    assert seen <= {1, 2}
