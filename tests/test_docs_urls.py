"""Every REST URL the README and docs/*.md mention exists: in openapi.yaml (path and, where
the text names one, method) and in the real app's URL map (matched as a request would
be). A documented URL that drifted (``POST /v1/partitions/<id>:deactivate`` answered
405) fails here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import yaml
from test_api import make_api

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPENAPI = ROOT / "openapi.yaml"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# The first segments of the daemon's REST namespace; anything else (resource.k8s.io/v1,
# /var/lib/kubelet) is not a URL of ours.
_OURS = r"/(?:v1/[^\s`'\"()\[\],|]*|healthz|readyz|livez|metrics)"
# A path starts after a space, a backtick, a bracket, a quote or a table bar, or right
# after a host's port (`localhost:9090/metrics`); `.../x` is the previous path's sibling.
_START = "|".join(["^", r"(?<=[\s`(\"'|])", *(rf"(?<=:\d{{{n}}})" for n in range(2, 6))])
_MENTION = re.compile(
    rf"(?:\b(?P<method>{'|'.join(METHODS)})\s+)?(?:{_START})(?P<path>{_OURS}|\.\.\./[\w-]+)"
)
_PLACEHOLDER = re.compile(r"^(?:\{\w+\}|<[\w ]+>|[\w.-]+)$")


@dataclass(frozen=True, slots=True)
class Mention:
    """One REST URL in a document: where, the method the text gives (None: none), path."""

    where: str
    method: str | None
    path: str


def mentions(text: str, where: str) -> list[Mention]:
    """Every REST URL in ``text``; ``where`` names the file for messages."""
    found: list[Mention] = []
    for number, line in enumerate(text.splitlines(), start=1):
        previous: Mention | None = None
        for match in _MENTION.finditer(line):
            path, method = match.group("path"), match.group("method")
            if path.startswith("..."):
                if previous is None:
                    continue  # a file path's elision (dra.md), not a sibling of ours
                path = previous.path.rsplit("/", 1)[0] + path[3:]
                method = method or previous.method
            path = re.sub(r"\[?\?.*$", "", path).rstrip(".:;")
            if method is None and "curl" in line and "-X" not in line:
                method = "GET"
            previous = Mention(f"{where}:{number}", method, path)
            found.append(previous)
    return found


def all_mentions() -> list[Mention]:
    return [m for doc in DOCS for m in mentions(doc.read_text(), doc.name)]


def openapi_operation(spec: dict[str, dict[str, object]], mention: Mention) -> str | None:
    """The openapi.yaml path template ``mention`` names, or None. A template parameter
    matches one segment that is a placeholder (``{id}``, ``<id>``) or a plain value."""
    segments = mention.path.strip("/").split("/")
    for template, operations in spec.items():
        parts = template.strip("/").split("/")
        if len(parts) != len(segments):
            continue
        if all(
            (p == s) or (p.startswith("{") and _PLACEHOLDER.match(s) is not None)
            for p, s in zip(parts, segments, strict=True)
        ):
            methods = {m.upper() for m in operations if m != "parameters"}
            if mention.method is None or mention.method in methods:
                return template
    return None


def test_the_docs_mention_rest_urls_at_all() -> None:
    found = all_mentions()
    paths = {m.path for m in found}
    # The README's table and the troubleshooting section: guards the extractor itself.
    assert {"/v1/node", "/v1/partitions/{id}/deactivate", "/v1/gpus/{module}/undrain"} <= paths
    assert any(m.method == "POST" for m in found)


def test_every_documented_url_is_in_openapi() -> None:
    spec = yaml.safe_load(OPENAPI.read_text())["paths"]
    wrong = [m for m in all_mentions() if openapi_operation(spec, m) is None]
    assert wrong == []


def test_the_checker_catches_a_colon_verb_and_a_wrong_method() -> None:
    spec = yaml.safe_load(OPENAPI.read_text())["paths"]
    text = (
        "with a token, `POST /v1/partitions/<id>:deactivate` frees one by hand.\n"
        "| `GET /v1/partitions/{id}/activate`, `.../deactivate` |\n"
        "curl -s http://<node>:9090/v1/partition\n"
    )
    found = mentions(text, "t.md")
    assert [(m.method, m.path) for m in found] == [
        ("POST", "/v1/partitions/<id>:deactivate"),
        ("GET", "/v1/partitions/{id}/activate"),
        ("GET", "/v1/partitions/{id}/deactivate"),
        ("GET", "/v1/partition"),
    ]
    assert [openapi_operation(spec, m) for m in found] == [None, None, None, None]


def _sample(path: str) -> str:
    """A request path for a documented one: placeholders become partition/module 1."""
    return re.sub(r"\{\w+\}|<[\w ]+>", "1", path)


async def test_every_documented_url_is_served_by_the_app(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from werkzeug.exceptions import MethodNotAllowed, NotFound

    api = await make_api(tmp_path, nursery)
    adapter = api.app.url_map.bind("localhost")
    failures = []
    for mention in all_mentions():
        try:
            adapter.match(_sample(mention.path), method=mention.method or "GET")
        except (NotFound, MethodNotAllowed) as exc:
            if mention.method is None and isinstance(exc, MethodNotAllowed):
                continue  # named without a method: served under some method
            failures.append(f"{mention}: {type(exc).__name__}")
    assert failures == []


@pytest.mark.parametrize(
    ("line", "paths"),
    [
        ("apiVersion: resource.k8s.io/v1", []),
        ("mount /var/lib/kubelet/plugins here", []),
        ("curl -s localhost:9090/healthz localhost:9090/readyz", ["/healthz", "/readyz"]),
        ("`GET /v1/partitions[?size=&state=]`", ["/v1/partitions"]),
    ],
)
def test_what_counts_as_a_rest_url(line: str, paths: list[str]) -> None:
    assert [m.path for m in mentions(line, "t.md")] == paths
