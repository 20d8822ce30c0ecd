"""One exception family: every error FedSeek defines is a `FedSeekError` of the kind that fits.

The walk imports every module of every FedSeek package (all import on a CPU-only machine), so a new
exception class that forgets the family fails here, not in front of an operator as a traceback.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.errors import (
    KINDS,
    Busy,
    Conflict,
    FedSeekError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthenticated,
    Unavailable,
    kind_for_status,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("federation", "node", "coordinator", "privacy", "explain", "fedseek_examples")

# Exceptions that never leave their module: control flow, caught where they are raised.
INTERNAL = {
    "privacy.audit._Invalid",  # one bad audit record, turned into a VerifyResult inside verify()
    # raised from an ASGI `receive` mid-parse; HTTPExceptions so FastAPI passes them through to the 413/408 handler
    "node.api.guard.BodyTooLarge",
    "node.api.guard.BodyTimeout",
    # a TLS verification failure by design (an ssl.SSLCertVerificationError), so clients treat it as a failed handshake
    "federation.security.peer_pin.PeerIdentityError",
    # the inspector's verifier ships alone in export bundles (stdlib + cryptography only): it cannot import FedSeek
    "privacy.inspector.Failed",
    "privacy.transparency._Refused",  # one failed witness check, turned into a WitnessReport inside verify_witnessed()
}


def _modules() -> Iterator[str]:
    for name in PACKAGES:
        package = importlib.import_module(name)
        # Every package walked must be ours (Opacus' wheel ships a top-level `examples`, the reason
        # ours installs as `fedseek_examples`).
        assert Path(package.__file__ or "").resolve().is_relative_to(ROOT), package.__file__
        yield name
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            yield info.name


def _defined_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module_name in _modules():
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module_name:
                found[f"{module_name}.{name}"] = obj
    return found


def test_every_exception_fedseek_defines_is_a_fedseek_error() -> None:
    defined = _defined_exceptions()
    assert "node.data.DataError" in defined and "privacy.ledger.BudgetExceeded" in defined  # the walk saw them
    assert defined.keys() >= INTERNAL, "an allow-listed exception is gone: drop it from INTERNAL"
    outside = sorted(name for name, cls in defined.items() if not issubclass(cls, FedSeekError))
    assert sorted(INTERNAL) == outside


@pytest.mark.parametrize(
    ("kind", "status", "openai_type"),
    [
        (FedSeekError, 500, "server_error"),
        (InvalidInput, 400, "invalid_request_error"),
        (Unauthenticated, 401, "authentication_error"),
        (Forbidden, 403, "permission_error"),
        (NotFound, 404, "invalid_request_error"),
        (Conflict, 409, "invalid_request_error"),
        (Busy, 429, "rate_limit_error"),
        (Unavailable, 503, "service_unavailable"),
    ],
)
def test_each_kind_has_its_status_type_and_exit_code(kind: type[FedSeekError], status: int, openai_type: str) -> None:
    error = kind("boom")
    assert (error.status, error.openai_type, error.exit_code, error.code) == (status, openai_type, 2, None)
    assert kind_for_status(status) is kind


def test_kinds_cover_each_status_once_and_anything_else_is_the_base() -> None:
    assert len({kind.http_status for kind in KINDS}) == len(KINDS)
    assert kind_for_status(418) is FedSeekError and kind_for_status(500) is FedSeekError


def test_one_line_is_the_first_line_or_the_class_name() -> None:
    assert InvalidInput("bad field\n  detail for the log").one_line() == "bad field"
    assert Busy().one_line() == "Busy" and Busy("  \n").one_line() == "Busy"
    assert Busy("full", code="my_queue").code == "my_queue"


def _cls(path: str) -> type[BaseException]:
    module, _, name = path.rpartition(".")
    cls: type[BaseException] = getattr(importlib.import_module(module), name)
    return cls


# What each module's error answers over HTTP: the status and `code` the node has always sent, so
# the HTTP layer can map any FedSeekError generically without changing a response.
@pytest.mark.parametrize(
    ("path", "kind", "code"),
    [
        ("node.service.Loading", Unavailable, "model_loading"),
        ("node.engine.UnknownModel", NotFound, "model_not_found"),
        ("node.serving.runner.UnknownAdapter", NotFound, "model_not_found"),
        ("node.serving.scheduler.QueueFull", Busy, "queue_full"),
        ("node.explain_service.QueueFull", Busy, "explanation_queue_full"),
        ("node.explain_service.ExplanationNotFound", NotFound, "explanation_not_found"),
        ("explain.attribution.NonFiniteScores", FedSeekError, "non_finite_scores"),
        ("privacy.ledger.BudgetExceeded", Conflict, "BudgetExceeded"),
        ("privacy.ledger.LedgerError", Conflict, "LedgerError"),
        ("privacy.ledger.PolicyError", Conflict, "PolicyError"),
        ("node.trainer.TrainingError", Conflict, "TrainingError"),
        ("coordinator.registry.RegistryError", Conflict, None),
        ("privacy.audit.AuditError", FedSeekError, None),
        ("federation.protocol.wire.WireError", InvalidInput, None),
        ("federation.protocol.config.ConfigError", InvalidInput, None),
        ("node.data.DataError", InvalidInput, None),
        ("privacy.lora_dp.UnsupportedLoraModel", InvalidInput, None),
        ("node.model.ModelLoadError", Unavailable, None),
        ("federation.ops.supervise.ProcessError", Unavailable, None),
        ("federation.security.sidecar.SidecarError", Unavailable, None),
        ("federation.security.fleet_gateway.GatewayError", Unavailable, None),
        ("federation.security.mtls_server.ServiceStartError", Unavailable, None),
        ("coordinator.service.CoordinatorError", Unavailable, None),
    ],
)
def test_module_errors_are_the_kind_they_answer_as(path: str, kind: type[FedSeekError], code: str | None) -> None:
    cls = _cls(path)
    assert issubclass(cls, kind)
    error = cls("x")
    assert isinstance(error, FedSeekError) and error.code == code


@pytest.mark.parametrize(
    ("path", "builtin"),
    [
        # callers (node/api, node/agent.py, coordinator/strategy.py) catch these as ValueError
        ("federation.protocol.wire.WireError", ValueError),
        ("federation.protocol.config.ConfigError", ValueError),
        ("node.data.DataError", ValueError),
        ("privacy.lora_dp.UnsupportedLoraModel", ValueError),
        # and every NotFound as LookupError
        ("node.engine.UnknownModel", LookupError),
        ("node.serving.runner.UnknownAdapter", LookupError),
        ("node.explain_service.ExplanationNotFound", LookupError),
    ],
)
def test_builtin_bases_callers_catch_are_kept(path: str, builtin: type[Exception]) -> None:
    assert issubclass(_cls(path), builtin)
