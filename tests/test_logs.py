"""Logging set-up: levels, text and JSON lines with extra fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from nvswitch_dp.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    out = io.StringIO()
    yield out
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_ts_level_logger_msg_and_extras(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    logging.getLogger("nvswitch_dp.test").info(
        "activated %d", 3, extra={"partition": 3, "gpus": [1, 2], "path": object()}
    )
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "info"
    assert entry["logger"] == "nvswitch_dp.test"
    assert entry["msg"] == "activated 3"
    assert entry["partition"] == 3
    assert entry["gpus"] == [1, 2]
    assert entry["path"].startswith("<object")  # not JSON: written as str()
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]


def test_json_includes_the_traceback(stream: io.StringIO) -> None:
    configure_logging("debug", "json", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "error"
    assert "RuntimeError: boom" in entry["exc"]


@pytest.mark.parametrize(
    ("level", "shown"),
    [("debug", 4), ("info", 3), ("warn", 2), ("WARNING", 2), ("error", 1)],
)
def test_levels(stream: io.StringIO, level: str, shown: int) -> None:
    configure_logging(level, "text", stream)
    log = logging.getLogger("levels")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert len(stream.getvalue().splitlines()) == shown


def test_text_lines_show_extras(stream: io.StringIO) -> None:
    configure_logging("info", "text", stream)
    logging.getLogger("t").warning("GPU fault", extra={"gpu_module": 3})
    line = stream.getvalue().strip()
    assert " WARNING t: GPU fault gpu_module=3" in line


def test_configuring_again_replaces_the_handler(stream: io.StringIO) -> None:
    first = configure_logging("info", "text", stream)
    second = configure_logging("info", "json", stream)
    root = logging.getLogger()
    assert second in root.handlers and first not in root.handlers
    logging.getLogger("again").info("once")
    assert len(stream.getvalue().splitlines()) == 1


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "text"), ("info", "xml")])
def test_unknown_level_or_format(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(level, fmt)
