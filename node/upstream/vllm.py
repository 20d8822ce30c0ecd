"""A vLLM OpenAI server that the site runs, behind the node: its transport and its adapters.

Past one GPU the site serves with vLLM (tensor and expert parallelism, batched multi-LoRA); the node
keeps everything that is the site's: authentication, access policy, audit, privacy ledger, metrics,
gray release. Requests are forwarded by node/api/upstream.py over `VllmClient`; adapters are kept in
step by `LoraSync`:

- vLLM holds the versions default traffic can reach (the release's stable version and candidate),
  loaded with `POST /v1/load_lora_adapter` from their PEFT export (node/upstream/peft_format.py), and
  any version a request names, loaded on demand. A release decision (deploy, promote, rollback,
  automatic rollback) unloads the others (`POST /v1/unload_lora_adapter`) and deletes their export.
- A deployment loads at once and says in its answer whether vLLM has the version; vLLM being down
  never fails a deployment: a background thread retries, and re-checks every `RESYNC_S` (a vLLM
  restart forgets every adapter loaded at run time), as does a request that vLLM answers 404.
- Every load and unload is an audit record (`upstream.loaded`, `upstream.unloaded`).

vLLM must run with `--enable-lora` (and `--max-lora-rank` at least the adapters' rank) and the
environment `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, else the load endpoint does not exist (404).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from federation.errors import FedSeekError, Unavailable
from federation.ops.mounts import filesystem_type, in_memory
from federation.protocol.config import ConfigError, NodeConfig
from node.upstream.metrics import UpstreamMetrics
from node.upstream.peft_format import export_dir_name, remove_export, write_peft_adapter

if TYPE_CHECKING:
    from node.engine import ModelHost
    from node.release import Release
    from privacy.audit import AuditTrail

__all__ = [
    "BACKENDS",
    "RESYNC_S",
    "LoraSync",
    "UpstreamError",
    "UpstreamUnavailable",
    "VllmBackend",
    "VllmClient",
    "VllmSettings",
    "open_backend",
]

log = logging.getLogger("fedseek.node.upstream")

BACKENDS = ("engine", "vllm")
RESYNC_S = 60.0
"""How often the adapters vLLM holds are checked against the release when nothing changed."""
RETRY_S = 5.0
"""How soon a failed adapter sync (vLLM down, starting) is tried again."""


class UpstreamUnavailable(Unavailable):
    """The site's vLLM server cannot be reached or did not answer in time (503)."""

    default_code = "upstream_unavailable"


class UpstreamError(FedSeekError):
    """vLLM refused an adapter load or unload, or answered what the node cannot read (500)."""

    default_code = "upstream_error"


@dataclass(frozen=True)
class VllmSettings:
    """Where the site's vLLM is and how the node talks to it (from `NodeConfig`'s `vllm_*` fields)."""

    url: str
    model: str
    """The base model's name in vLLM (`--served-model-name`)."""
    lora_dir: Path
    """Where the node writes each version's PEFT export."""
    lora_dir_in_vllm: str
    """The same directory as vLLM's process sees it (a container mount); the load request names it."""
    api_key: str | None = None
    timeout_s: float = 600.0
    connect_timeout_s: float = 5.0

    @classmethod
    def from_config(cls, config: NodeConfig, *, model_name: str, state_dir: Path) -> VllmSettings:
        """The settings a node config asks for; ConfigError (one line) for a URL or key file that cannot be used."""
        url = config.vllm_url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"serving_backend 'vllm' needs vllm_url, an http(s) URL (got {config.vllm_url!r})")
        url = url.removesuffix("/v1")
        key = None
        if config.vllm_api_key_file:
            try:
                key = Path(config.vllm_api_key_file).read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"cannot read vllm_api_key_file {config.vllm_api_key_file}: {exc.strerror}") from exc
        lora_dir = Path(config.vllm_lora_dir) if config.vllm_lora_dir else state_dir / "vllm-lora"
        if config.kek and not in_memory(lora_dir):
            # vLLM loads adapters from files in clear: at a site whose files are under a KEK they may
            # live in memory only, never on a disk.
            raise ConfigError(
                f"this site encrypts its files at rest (kek), but vLLM's adapter exports would be written in clear "
                f"to {lora_dir} ({filesystem_type(lora_dir)}): set vllm_lora_dir to a directory on a tmpfs "
                "(e.g. /dev/shm/fedseek-vllm-lora, mounted into vLLM's container)"
            )
        if config.vllm_timeout_s <= 0:
            raise ConfigError(f"vllm_timeout_s must be positive, not {config.vllm_timeout_s}")
        return cls(
            url=url,
            model=config.vllm_model or model_name,
            lora_dir=lora_dir,
            lora_dir_in_vllm=(config.vllm_lora_dir_in_vllm or str(lora_dir)).rstrip("/"),
            api_key=key,
            timeout_s=config.vllm_timeout_s,
        )


class VllmClient:
    """HTTP to vLLM: async for forwarded requests (streamed, never buffered), sync for adapter calls.

    `transport`/`sync_transport` replace the network (httpx's transports: a test's MockTransport).
    Transport failures and timeouts become UpstreamUnavailable (503) with one line naming vLLM's URL.
    """

    def __init__(
        self,
        settings: VllmSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sync_transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self._transport = transport
        headers = {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._headers = headers
        self._timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        self._sync = httpx.Client(
            base_url=settings.url,
            headers=headers,
            timeout=httpx.Timeout(30.0, connect=settings.connect_timeout_s),
            transport=sync_transport,
        )
        self._async: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> httpx.AsyncClient:
        """One pooled client per event loop (a client's connections belong to the loop that opened them)."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._loop is not loop:
            self._async = httpx.AsyncClient(
                base_url=self.settings.url, headers=self._headers, timeout=self._timeout, transport=self._transport
            )
            self._loop = loop
        return self._async

    def unreachable(self, exc: Exception) -> UpstreamUnavailable:
        detail = str(exc).splitlines()[0] if str(exc).strip() else "no answer"
        return UpstreamUnavailable(
            f"the serving backend (vLLM at {self.settings.url}) is unavailable: {type(exc).__name__}: {detail}"
        )

    async def open(self, path: str, body: bytes) -> httpx.Response:
        """POST `body` (JSON) to `path`; the response is open, its body unread: the caller reads or streams
        it, then closes it (closing early makes vLLM abort the request)."""
        client = self._client()
        request = client.build_request("POST", path, content=body, headers={"content-type": "application/json"})
        try:
            return await client.send(request, stream=True)
        except httpx.HTTPError as exc:  # connect, read timeout, protocol: vLLM is not there to answer
            raise self.unreachable(exc) from exc

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> httpx.Response:
        """A small synchronous call (adapter load/unload, model list), read whole."""
        try:
            return self._sync.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise self.unreachable(exc) from exc

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()

    def close(self) -> None:
        self._sync.close()


class LoraSync:
    """Keeps vLLM's run-time adapters in step with the node's release (see the module's docstring)."""

    def __init__(
        self,
        client: VllmClient,
        *,
        host: ModelHost,
        release: Release,
        audit: AuditTrail,
        metrics: UpstreamMetrics,
    ) -> None:
        self.client = client
        self.settings = client.settings
        self.host = host
        self.release = release
        self.audit = audit
        self.metrics = metrics
        self._lock = threading.RLock()
        self._loaded: dict[str, str] = {}  # version -> the path vLLM loaded it from (as vLLM sees it)
        self._wake = threading.Event()
        self._prune = True  # the next background sync also unloads what the release no longer routes to
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False  # the background thread is in a sync (set before it clears `_wake`)
        self.last_error: str | None = None

    # ---- what vLLM should hold -------------------------------------------------------------
    def wanted(self) -> list[str]:
        """The versions default traffic can reach: the release's stable version and candidate."""
        routed = (self.release.stable, self.release.candidate)
        return [v for v in routed if v is not None and v in self.host.adapters]

    def listed(self) -> set[str]:
        """The adapters vLLM serves now (`GET /v1/models`: every card with a parent is a LoRA)."""
        resp = self.client.call("GET", "/v1/models")
        if resp.status_code != 200:
            raise UpstreamError(f"vLLM's /v1/models answered {resp.status_code}: {_message(resp)}")
        try:
            cards = resp.json()["data"]
            return {str(c["id"]) for c in cards if c.get("parent")}
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"vLLM's /v1/models is not a model list: {exc}") from exc

    def loaded(self) -> set[str]:
        """The versions the node loaded into vLLM, as far as it knows (vLLM may have restarted since)."""
        with self._lock:
            return set(self._loaded)

    # ---- sync -------------------------------------------------------------------------------
    def sync(self, *, prune: bool = True) -> dict[str, Any]:
        """Load what the release routes to and vLLM lacks; with `prune`, unload the installed versions it
        no longer routes to. Returns what vLLM holds of the node's versions, and the one-line error if the
        sync failed (the background thread then tries again within `RETRY_S`)."""
        try:
            with self._lock:
                listed = self.listed()
                self._loaded = {v: p for v, p in self._loaded.items() if v in listed}  # vLLM restarted: forgotten
                wanted = self.wanted()
                if prune:
                    for version in sorted((listed & set(self.host.adapters)) - set(wanted)):
                        self._unload(version, reason="not routed by the release")
                for version in wanted:
                    if version not in listed:
                        self._load(version)
                    else:
                        self._loaded.setdefault(version, self._path_in_vllm(version))
                self.metrics.adapters.set(len(self._loaded))
                self.metrics.up.set(1)
                self.last_error = None
                return {"backend": "vllm", "loaded": sorted(self._loaded), "error": None}
        except FedSeekError as exc:
            self.last_error = exc.one_line()
            self.metrics.up.set(0 if isinstance(exc, UpstreamUnavailable) else 1)
            log.warning("vLLM adapter sync failed (retrying within %.0f s): %s", RETRY_S, self.last_error)
            self._prune = self._prune or prune
            if threading.current_thread() is not self._thread:
                self._wake.set()  # the background thread takes over the retries
            return {"backend": "vllm", "loaded": sorted(self.loaded()), "error": self.last_error}

    def holds(self, version: str) -> bool:
        """Whether the node loaded `version` into vLLM (no lock, no call: every request asks)."""
        return version in self._loaded

    def ensure(self, version: str, *, recheck: bool = False) -> None:
        """Before a request for `version`: load it if vLLM does not hold it (`recheck`: vLLM answered 404)."""
        if not recheck and self.holds(version):
            return
        with self._lock:
            if version in self._loaded and not recheck:
                return
            if recheck or version not in self.listed():
                self._loaded.pop(version, None)
                self._load(version)
            else:
                self._loaded[version] = self._path_in_vllm(version)
            self.metrics.adapters.set(len(self._loaded))

    def _path_in_vllm(self, version: str) -> str:
        return f"{self.settings.lora_dir_in_vllm}/{export_dir_name(version, self.host.adapters[version].sha256)}"

    def _load(self, version: str) -> None:
        info = self.host.adapters[version]
        local = write_peft_adapter(
            self.settings.lora_dir,
            version=version,
            sha256=info.sha256,
            arrays=self.host.adapter_arrays(version),
            lora_config=self.host.peft.peft_config[version],
            base_model=self.settings.model,
        )
        path = self._path_in_vllm(version)
        resp = self.client.call("POST", "/v1/load_lora_adapter", {"lora_name": version, "lora_path": path})
        if resp.status_code != 200 and not (resp.status_code == 400 and "already been loaded" in resp.text):
            if resp.status_code == 404:
                why = (
                    "vLLM has no /v1/load_lora_adapter: start it with --enable-lora and "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                )
            else:
                why = f"vLLM answered {resp.status_code}: {_message(resp)}"
            remove_export(local)
            raise UpstreamError(f"cannot load adapter {version} into vLLM: {why}")
        self._loaded[version] = path
        self.audit.append(
            actor="node",
            action="upstream.loaded",
            resource=version,
            details={"backend": "vllm", "url": self.settings.url, "path": path, "sha256": info.sha256},
        )
        log.info("loaded adapter %s into vLLM from %s", version, path)

    def _unload(self, version: str, *, reason: str) -> None:
        resp = self.client.call("POST", "/v1/unload_lora_adapter", {"lora_name": version})
        if resp.status_code not in (200, 404):  # 404: vLLM does not hold it (anymore)
            raise UpstreamError(f"cannot unload adapter {version} from vLLM: {resp.status_code}: {_message(resp)}")
        self._loaded.pop(version, None)
        info = self.host.adapters.get(version)
        if info is not None:
            remove_export(self.settings.lora_dir / export_dir_name(version, info.sha256))
        self.audit.append(
            actor="node",
            action="upstream.unloaded",
            resource=version,
            details={"backend": "vllm", "url": self.settings.url, "reason": reason},
        )
        log.info("unloaded adapter %s from vLLM (%s)", version, reason)

    # ---- in the background --------------------------------------------------------------------
    def wake(self, *, prune: bool = True) -> None:
        """Ask the background thread to sync soon (quick: a release decision calls it under its lock)."""
        self._prune = self._prune or prune
        self._wake.set()

    def start(self) -> LoraSync:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fedseek-vllm-lora-sync", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(RETRY_S if self.last_error else RESYNC_S)
            if self._stop.is_set():
                return
            self._running = True
            self._wake.clear()
            prune, self._prune = self._prune, False  # a periodic check only loads what is missing
            try:
                self.sync(prune=prune)
            except Exception:  # a bug must not end the thread: the next round tries again
                log.exception("vLLM adapter sync failed")
            finally:
                self._running = False

    def settle(self, timeout_s: float) -> bool:
        """Wait until no background sync is asked for or running (at most `timeout_s`); whether it settled.
        A release decision wakes the thread after `sync` already ran in the caller: whoever changes vLLM's
        adapters by hand next (an operator's script, a test) waits for it first, or the thread undoes it."""
        deadline = time.monotonic() + timeout_s
        while self._wake.is_set() or self._running:  # `_running` is set before `_wake` clears: no gap
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class VllmBackend:
    """The node's view of the site's vLLM: the client, the adapter sync, the metrics, the model names."""

    name = "vllm"

    def __init__(
        self,
        settings: VllmSettings,
        *,
        host: ModelHost,
        release: Release,
        audit: AuditTrail,
        transport: httpx.AsyncBaseTransport | None = None,
        sync_transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.metrics = UpstreamMetrics()
        self.client = VllmClient(settings, transport=transport, sync_transport=sync_transport)
        self.adapters = LoraSync(self.client, host=host, release=release, audit=audit, metrics=self.metrics)

    def upstream_model(self, version: str | None) -> str:
        """The name vLLM knows a node model by: the base model's served name, or the version itself."""
        return self.settings.model if version is None else version

    def start(self, *, on_change: Callable[[Callable[[], None]], None] | None = None) -> VllmBackend:
        """Sync adapters in the background from now on (the first sync at once); `on_change` registers
        the wake-up with the release so every decision is followed by a sync."""
        if on_change is not None:
            on_change(self.adapters.wake)
        self.adapters.wake(prune=True)
        self.adapters.start()
        return self

    def close(self) -> None:
        self.adapters.close()
        self.client.close()


def open_backend(
    config: NodeConfig, *, host: ModelHost, release: Release, audit: AuditTrail, state_dir: Path
) -> VllmBackend | None:
    """The backend `config.serving_backend` names: None for the node's own engine, else a started
    VllmBackend. ConfigError (one line) for an unknown backend or unusable vLLM settings."""
    if config.serving_backend not in BACKENDS:
        raise ConfigError(f"serving_backend must be one of {', '.join(BACKENDS)}, not {config.serving_backend!r}")
    if config.serving_backend == "engine":
        return None
    settings = VllmSettings.from_config(config, model_name=host.model_name, state_dir=state_dir)
    backend = VllmBackend(settings, host=host, release=release, audit=audit)
    return backend.start(on_change=release.on_change)


def _message(resp: httpx.Response) -> str:
    """The one-line message of a vLLM error answer (OpenAI's shape, or plain text)."""
    try:
        body = resp.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("detail", body)
    except (ValueError, KeyError, TypeError, AttributeError):
        message = resp.text
    text = str(message).strip()
    return text.splitlines()[0][:300] if text else f"HTTP {resp.status_code}"
