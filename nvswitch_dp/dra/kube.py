"""The Kubernetes API calls of the DRA mode, and nothing more.

**Client: lightkube** (1.0.1, models 1.37.0.8, on httpx2 2.16.2). Chosen because it runs
under Trio directly: httpx2's transport (httpcore2) picks its backend with sniffio and has
a native Trio one, so calls are plain Trio awaits (cancellable, deadline-bounded) with no
hop through the trio-asyncio loop; verified by running it under ``trio.run`` both bare and
inside ``trio_asyncio.open_loop()`` (sniffio reports "trio" in Trio tasks there). Its
models cover ``resource.k8s.io/v1`` ResourceSlice and ResourceClaim up to 1.37 (shared
counters, consumesCounters). The others: kubernetes-asyncio is built on aiohttp, asyncio
only, so every call would cross into the asyncio loop; kr8s keys its client cache on
``asyncio.get_running_loop()``, which fails in a Trio task.

Two lightkube habits shape this module: its typed models drop fields they do not know
(harmless: we write whole slices we built, and read claims for fields the models know),
and it raises ``ApiError`` only for answers of type ``application/json`` (anything else
arrives as httpx2's ``HTTPStatusError``); both are mapped to the errors below.

Configuration (:func:`load_config`): the kubeconfig path given, else ``$KUBECONFIG``, else
the in-cluster service account. The environment's proxy variables are not used.

Errors, one class per failure (all :class:`KubeError`):
:class:`KubeUnavailable` (no answer, 5xx, 429: retry later), :class:`SliceConflict` (409:
re-read, then retry), :class:`ClaimNotFound` (404 on a claim) and :class:`ClaimUnreadable`
(any other failure reading one; both also the port's errors of
:mod:`nvswitch_dp.dra.errors`), :class:`KubeRejected`
(any other 4xx, with the API server's reason and causes: retrying the same request will
not help), :class:`KubeConfigError` (no usable configuration).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import httpx2
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube.resources.resource_v1 import ResourceClaim, ResourceClaimStatus, ResourceSlice

from nvswitch_dp.dra import errors

DEFAULT_TIMEOUT_S = 10.0
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
FIELD_MANAGER = "nvswitch-dp"


class KubeError(Exception):
    """A Kubernetes API call failed; the message names the call and the answer."""


class KubeConfigError(KubeError):
    """No usable kubeconfig or in-cluster configuration (the message says which was tried)."""


class KubeUnavailable(KubeError):
    """The API server did not answer, or answered 5xx/429: retry later with backoff."""


class SliceConflict(KubeError):
    """409: the slice changed since it was read (or already exists): re-read, then retry."""


class ClaimNotFound(errors.ClaimNotFound, KubeError):
    """The ResourceClaim does not exist (404): it was deleted, or never was. Also the
    kubelet side's :class:`nvswitch_dp.dra.errors.ClaimNotFound` (the ClaimReader port)."""


class ClaimUnreadable(errors.ClaimUnreadable, KubeError):
    """Reading a ResourceClaim failed otherwise (unreachable, 401/403, 5xx); ``cause`` is
    the mapped :class:`KubeError`. Also the port's
    :class:`nvswitch_dp.dra.errors.ClaimUnreadable`."""

    def __init__(self, cause: KubeError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class Cause:
    reason: str
    field: str
    message: str


class KubeRejected(KubeError):
    """The API server refused the request (4xx other than 404 on a claim and 409)."""

    def __init__(self, message: str, *, code: int, reason: str, causes: tuple[Cause, ...] = ()):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.causes = causes


def load_config(
    kubeconfig: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> KubeConfig:
    """The client configuration: ``kubeconfig`` if given, else ``$KUBECONFIG``, else the
    in-cluster service account (``KUBERNETES_SERVICE_HOST``/``_PORT`` and the token and CA
    under ``service_account_dir``). Raises :class:`KubeConfigError` naming what was tried."""
    env = os.environ if environ is None else environ
    path = kubeconfig if kubeconfig else env.get("KUBECONFIG", "")
    if path:
        # KUBECONFIG may list several files; like kubectl's default we take the first.
        first = str(path).split(os.pathsep)[0]
        try:
            return KubeConfig.from_file(first)
        except (OSError, ConfigError, ValueError) as exc:
            raise KubeConfigError(f"kubeconfig {first}: {exc}") from exc
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError(
            "no kubeconfig: give --kubeconfig or set KUBECONFIG, or run in a pod "
            "(KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set)"
        )
    token = service_account_dir / "token"
    try:
        token_text = token.read_text().strip()
    except OSError as exc:
        raise KubeConfigError(f"in-cluster: cannot read the token {token}: {exc}") from exc
    server_host = f"[{host}]" if ":" in host else host
    return KubeConfig.from_dict(
        {
            "clusters": [
                {
                    "name": "in-cluster",
                    "cluster": {
                        "server": f"https://{server_host}:{port}",
                        "certificate-authority": str(service_account_dir / "ca.crt"),
                    },
                }
            ],
            "users": [
                # tokenFile: the kubelet rotates projected tokens; lightkube re-reads it.
                {"name": "in-cluster", "user": {"token": token_text, "tokenFile": str(token)}}
            ],
            "contexts": [
                {"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "in-cluster"}}
            ],
            "current-context": "in-cluster",
        }
    )


def _status_of(exc: httpx2.HTTPStatusError) -> tuple[int, str, str, tuple[Cause, ...]]:
    code = exc.response.status_code
    if isinstance(exc, ApiError):
        status = exc.status
        details = status.details
        causes = tuple(
            Cause(c.reason or "", c.field or "", c.message or "")
            for c in ((details.causes or []) if details is not None else [])
        )
        return code, status.reason or "", status.message or "", causes
    return code, exc.response.reason_phrase, exc.response.text[:200], ()


def _slice_model(obj: Mapping[str, Any]) -> ResourceSlice:
    return cast(ResourceSlice, ResourceSlice.from_dict(dict(obj)))


def _as_dict(model: ResourceSlice | ResourceClaim) -> dict[str, Any]:
    return cast(dict[str, Any], model.to_dict())


class KubeClient:
    """The DRA mode's API client: ResourceSlices of one driver, and ResourceClaim reads.

    Owns one lightkube ``AsyncClient`` (one connection pool); close it with
    :meth:`aclose` or ``async with``. Methods take and return plain JSON dicts. Every
    call is bounded by ``timeout_s`` and may be cancelled.
    """

    def __init__(self, config: KubeConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._client = AsyncClient(
            config,
            timeout=httpx2.Timeout(timeout_s),
            field_manager=FIELD_MANAGER,
            trust_env=False,
        )

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | Path | None = None, **kwargs: Any) -> KubeClient:
        """A client configured by :func:`load_config`."""
        return cls(load_config(kubeconfig), **kwargs)

    async def aclose(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _failure(self, call: str, exc: Exception) -> KubeError:
        if isinstance(exc, httpx2.HTTPStatusError):
            code, reason, message, causes = _status_of(exc)
            text = f"{call}: {code} {reason}: {message}"
            if code == 409:
                return SliceConflict(text)
            if code >= 500 or code == 429:
                return KubeUnavailable(text)
            return KubeRejected(text, code=code, reason=reason, causes=causes)
        # Transport errors (refused, reset, timeout) and undecodable answers.
        return KubeUnavailable(f"{call}: {type(exc).__name__}: {exc or 'no answer'}")

    async def list_slices(self, node_name: str, driver: str) -> list[dict[str, Any]]:
        """Every ResourceSlice of ``driver`` on ``node_name`` (field selectors
        ``spec.nodeName`` and ``spec.driver``, which the API server indexes)."""
        call = f"list ResourceSlices of {driver} on {node_name}"
        try:
            return [
                _as_dict(s)
                async for s in self._client.list(
                    ResourceSlice, fields={"spec.nodeName": node_name, "spec.driver": driver}
                )
            ]
        except (httpx2.HTTPError, ValueError) as exc:
            raise self._failure(call, exc) from exc

    async def create_slice(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create ``obj``; the stored object (with its resourceVersion) is returned.
        :class:`SliceConflict` when it exists already."""
        call = f"create ResourceSlice {obj['metadata']['name']}"
        try:
            created = await self._client.create(_slice_model(obj))
        except (httpx2.HTTPError, ValueError) as exc:
            raise self._failure(call, exc) from exc
        return _as_dict(created)

    async def dry_run_create_slice(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create ``obj`` with ``dryRun=All`` (validated, admitted, not stored); the object as
        the server would have stored it. What a server without a feature drops is missing
        from the answer."""
        call = f"create ResourceSlice {obj['metadata']['name']} (dry run)"
        try:
            created = await self._client.create(_slice_model(obj), dry_run=True)
        except (httpx2.HTTPError, ValueError) as exc:
            raise self._failure(call, exc) from exc
        return _as_dict(created)

    async def update_slice(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the slice named in ``obj`` (PUT); ``obj['metadata']['resourceVersion']``
        must be the one last read. :class:`SliceConflict` when it is stale."""
        call = f"update ResourceSlice {obj['metadata']['name']}"
        try:
            replaced = await self._client.replace(_slice_model(obj))
        except (httpx2.HTTPError, ValueError) as exc:
            raise self._failure(call, exc) from exc
        return _as_dict(replaced)

    async def delete_slice(self, name: str) -> None:
        """Delete the slice ``name``; one that is gone already is not an error."""
        try:
            await self._client.delete(ResourceSlice, name)
        except (httpx2.HTTPError, ValueError) as exc:
            if isinstance(exc, httpx2.HTTPStatusError) and exc.response.status_code == 404:
                return
            raise self._failure(f"delete ResourceSlice {name}", exc) from exc

    async def update_claim_status(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the status of the ResourceClaim ``obj`` names (PUT ``.../status``;
        ``metadata.resourceVersion`` must be the one read). :class:`SliceConflict` on 409
        (the name is historical: any stale write), :class:`ClaimNotFound` on 404."""
        meta = obj["metadata"]
        call = f"update the status of ResourceClaim {meta['namespace']}/{meta['name']}"
        try:
            model = cast(ResourceClaimStatus, ResourceClaimStatus.from_dict(dict(obj)))
            replaced = await self._client.replace(model, meta["name"], namespace=meta["namespace"])
        except (httpx2.HTTPError, ValueError) as exc:
            if isinstance(exc, httpx2.HTTPStatusError) and exc.response.status_code == 404:
                raise ClaimNotFound(meta["namespace"], meta["name"]) from exc
            raise self._failure(call, exc) from exc
        return cast(dict[str, Any], replaced.to_dict())

    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        """The ResourceClaim ``namespace/name`` as a dict (this is the
        :class:`nvswitch_dp.ports.ClaimReader`). :class:`ClaimNotFound` on 404,
        :class:`ClaimUnreadable` for any other failure."""
        try:
            claim = await self._client.get(ResourceClaim, name, namespace=namespace)
        except (httpx2.HTTPError, ValueError) as exc:
            if isinstance(exc, httpx2.HTTPStatusError) and exc.response.status_code == 404:
                raise ClaimNotFound(namespace, name) from exc
            failure = self._failure(f"get ResourceClaim {namespace}/{name}", exc)
            raise ClaimUnreadable(failure) from exc
        return _as_dict(claim)
