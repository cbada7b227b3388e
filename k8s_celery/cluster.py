"""The only code that talks to the Kubernetes API.

:class:`KubeApi` is a small JSON client over the connection pool that the official
``kubernetes`` package configures (kubeconfig, in-cluster service account, client
certificates, token refresh). It works with plain dicts instead of the generated
models: building a model per object is slow and contends on a lock across threads
(kubernetes-client/python #2284), and the shim only ever needs a few fields.

Every request is retried with exponential backoff on 429, 5xx and connection
errors, never on other 4xx answers, which are the caller's mistake.

:class:`~k8s_celery.watch.Watcher` (``watch.py``) builds one list+watch on it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import quote, urlencode

import tenacity
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Seconds a bearer token is reused before the configuration is asked again (it refreshes
#: expiring tokens, and service-account tokens rotated on disk).
AUTH_TTL = 1.0


class ApiError(Exception):
    """An error answer from the API server (or no answer at all, ``status == 0``)."""

    def __init__(self, status: int, reason: str, message: str = "", body: dict | None = None):
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")

    @property
    def retryable(self) -> bool:
        return self.status == 0 or self.status in RETRYABLE_STATUSES

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def gone(self) -> bool:
        return self.status == 410

    @property
    def quota_exceeded(self) -> bool:
        """A ResourceQuota refused the object: it may fit once other objects are gone."""
        return self.status == 403 and "exceeded quota" in self.message


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiError):
        return exc.retryable
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


@dataclass
class RetryPolicy:
    """How long and how often to retry a failing request."""

    attempts: int = 8
    initial_wait: float = 0.2
    max_wait: float = 10.0

    def retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_transient),
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait),
            before_sleep=_log_retry,
            reraise=True,
        )


def _log_retry(state: tenacity.RetryCallState) -> None:
    log.warning(
        "Kubernetes API call failed (%s), retry %d in %.1fs",
        state.outcome.exception() if state.outcome else "?",
        state.attempt_number,
        state.next_action.sleep if state.next_action else 0,
    )


def load_configuration(kubeconfig: str | None = None, context: str | None = None,
                       in_cluster: bool | None = None) -> k8s_client.Configuration:
    """Build a client configuration from a kubeconfig file or the pod's service account.

    With ``in_cluster=None`` the service account is used when running in a pod and no
    kubeconfig was given, like ``kubectl`` and client-go do.
    """
    configuration = k8s_client.Configuration()
    if in_cluster is None:
        in_cluster = kubeconfig is None and _running_in_cluster()
    if in_cluster:
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        k8s_config.load_kube_config(config_file=kubeconfig, context=context,
                                    client_configuration=configuration)
    return configuration


def _running_in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token")


class RateLimiter:
    """A token bucket, like client-go's: at most ``qps`` requests a second, bursts of ``burst``."""

    def __init__(self, qps: float = 50.0, burst: int = 100):
        self.qps = qps
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if self.qps <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


class KubeApi:
    """A JSON client for the Kubernetes REST API with retries and a request-rate limit.

    Paths are REST paths (``/apis/batch/v1/namespaces/ns/jobs``); bodies and answers
    are dicts.
    """

    def __init__(self, configuration: k8s_client.Configuration, retry: RetryPolicy | None = None,
                 timeout: float = 30.0, on_error: Callable[[ApiError], None] | None = None,
                 rate_limiter: RateLimiter | None = None):
        configuration.retries = False  # our retry policy is the only one
        if configuration.connection_pool_maxsize is None or configuration.connection_pool_maxsize < 16:
            configuration.connection_pool_maxsize = 16
        self.configuration = configuration
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.on_error = on_error
        self.rate_limiter = rate_limiter or RateLimiter()
        self._pool = k8s_client.rest.RESTClientObject(configuration).pool_manager
        self.host = configuration.host.rstrip("/")
        self._authorization_value: str | None = None
        self._authorization_at = -AUTH_TTL

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None, **kwargs) -> KubeApi:
        return cls(load_configuration(path, context, in_cluster=False), **kwargs)

    # -- raw requests ------------------------------------------------------------------

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "k8s-celery"}
        authorization = self._authorization()
        if authorization:
            headers["Authorization"] = authorization
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _authorization(self) -> str | None:
        """The bearer token, asked of the configuration at most every :data:`AUTH_TTL` seconds.

        The client's refresh hook (an expiring or rotated token) runs on every ask and sets
        the configuration's host again, which reads every proxy variable of the environment:
        asked per request, that was 2.5% of the worker's CPU at a high launch rate (py-spy).
        """
        now = time.monotonic()
        if now - self._authorization_at >= AUTH_TTL:
            auth = self.configuration.auth_settings().get("BearerToken") or {}
            self._authorization_value = auth.get("value") or None
            self._authorization_at = now
        return self._authorization_value

    def url(self, path: str, params: dict[str, Any] | None = None) -> str:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return self.host + path + ("?" + urlencode(query) if query else "")

    def request_once(self, method: str, path: str, body: Any = None, params: dict | None = None,
                     content_type: str = "application/json", timeout: float | None = None) -> dict:
        """One request, no retry. Raises :class:`ApiError` on any non-2xx answer."""
        data = json.dumps(body).encode() if body is not None else None
        self.rate_limiter.acquire()
        try:
            response = self._pool.request(
                method, self.url(path, params), body=data,
                headers=self._headers(content_type if data is not None else None),
                timeout=urllib3.Timeout(connect=5.0, read=timeout or self.timeout),
                retries=False, preload_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(0, type(exc).__name__, str(exc)) from exc
        if not 200 <= response.status < 300:
            error = _error_from_response(response.status, response.reason, response.data)
            if self.on_error:
                self.on_error(error)
            raise error
        if not response.data:
            return {}
        if "json" not in (response.headers.get("Content-Type") or ""):
            return {"text": response.data.decode(errors="replace")}
        return json.loads(response.data)

    def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                content_type: str = "application/json", timeout: float | None = None) -> dict:
        """A request retried on 429, 5xx and connection errors."""
        for attempt in self.retry.retrying():
            with attempt:
                return self.request_once(method, path, body, params, content_type, timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- verbs -------------------------------------------------------------------------

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params)

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict, strategy: str = "strategic-merge-patch") -> dict:
        return self.request("PATCH", path, body, content_type=f"application/{strategy}+json")

    def delete(self, path: str, propagation: str | None = "Background",
               grace_period: int | None = None, uid: str | None = None) -> dict | None:
        """Delete an object; ``None`` when it was already gone."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation:
            options["propagationPolicy"] = propagation
        if grace_period is not None:
            options["gracePeriodSeconds"] = grace_period
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            return self.request("DELETE", path, options)
        except ApiError as exc:
            if exc.not_found or (uid and exc.conflict):
                return None
            raise

    def list(self, path: str, label_selector: str | None = None, field_selector: str | None = None,
             limit: int = 500) -> tuple[list[dict], str]:
        """Every object of a collection (paginated) and the list's resourceVersion."""
        items: list[dict] = []
        token = None
        while True:
            page = self.get(path, labelSelector=label_selector, fieldSelector=field_selector,
                            limit=limit, **{"continue": token})
            items.extend(page.get("items") or [])
            token = page.get("metadata", {}).get("continue")
            if not token:
                return items, page.get("metadata", {}).get("resourceVersion", "")

    def watch(self, path: str, resource_version: str, label_selector: str | None = None,
              field_selector: str | None = None, timeout_seconds: int = 300,
              read_timeout: float = 60.0) -> Iterator[tuple[str, dict]]:
        """Yield ``(type, object)`` events of one watch request until it ends.

        Raises :class:`ApiError` (``status == 410`` for Gone) for an ``ERROR`` event or
        an error answer. A read timeout ends the generator with ``TimeoutError``.
        """
        params = {"watch": "true", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": timeout_seconds,
                  "labelSelector": label_selector, "fieldSelector": field_selector}
        try:
            buffer = b""
            for chunk in self.stream(path, params, read_timeout):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        status = event.get("object", {})
                        raise ApiError(status.get("code", 500), status.get("reason", "Error"),
                                       status.get("message", ""), status)
                    yield event["type"], event["object"]
        except TimeoutError as exc:
            raise TimeoutError(f"watch on {path} read nothing for {read_timeout}s") from exc

    def stream(self, path: str, params: dict | None = None, read_timeout: float = 60.0) -> Iterator[bytes]:
        """Yield the raw body of a GET as it arrives (a watch, a followed log), no retry.

        Raises :class:`ApiError` for an error answer or a broken connection, and
        ``TimeoutError`` when nothing arrives for ``read_timeout`` seconds. Long-lived
        by nature, it takes no token of the rate limit.
        """
        try:
            response = self._pool.request(
                "GET", self.url(path, params), headers=self._headers(),
                timeout=urllib3.Timeout(connect=5.0, read=read_timeout),
                retries=False, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(0, type(exc).__name__, str(exc)) from exc
        try:
            if response.status != 200:
                raise _error_from_response(response.status, response.reason, response.read())
            yield from response.stream(65536, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise TimeoutError(f"GET {path} read nothing for {read_timeout}s") from exc
        except urllib3.exceptions.ProtocolError as exc:
            raise ApiError(0, "ProtocolError", str(exc)) from exc
        finally:
            response.release_conn()


def _error_from_response(status: int, reason: str | None, data: bytes | None) -> ApiError:
    body: dict = {}
    message = ""
    if data:
        try:
            body = json.loads(data)
            message = body.get("message", "")
        except ValueError:
            message = data[:500].decode(errors="replace")
    return ApiError(status, body.get("reason") or reason or "", message, body)


def collection_path(kind: str, namespace: str | None = None) -> str:
    """REST path of a collection: ``collection_path('jobs', 'ns')``."""
    group = {"jobs": "/apis/batch/v1", "deployments": "/apis/apps/v1", "leases": "/apis/coordination.k8s.io/v1",
             "roles": "/apis/rbac.authorization.k8s.io/v1",
             "rolebindings": "/apis/rbac.authorization.k8s.io/v1",
             "clusterroles": "/apis/rbac.authorization.k8s.io/v1",
             "clusterrolebindings": "/apis/rbac.authorization.k8s.io/v1",
             "selfsubjectaccessreviews": "/apis/authorization.k8s.io/v1",
             }.get(kind, "/api/v1")
    if namespace:
        return f"{group}/namespaces/{quote(namespace)}/{kind}"
    return f"{group}/{kind}"


def object_path(kind: str, namespace: str | None, name: str, subresource: str = "") -> str:
    """REST path of one object (and optionally a subresource such as ``status``)."""
    path = f"{collection_path(kind, namespace)}/{quote(name)}"
    return f"{path}/{subresource}" if subresource else path
