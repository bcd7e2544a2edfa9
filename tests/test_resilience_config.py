"""Resilience config models: defaults, validation, and the runtime objects they build."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from nodeproxy.resilience.config import (
    CircuitBreakersConfig,
    FaultConfig,
    HeaderConditionConfig,
    LoadBalancingConfig,
    OutlierDetectionConfig,
    RateLimitConfig,
    RetryBudgetConfig,
    RetryConfig,
    RouteResilience,
    ServiceResilience,
)
from nodeproxy.resilience.retry import RetryOn


def test_defaults_are_linkerds_envoys_and_istios() -> None:
    service = ServiceResilience()
    assert service.load_balancing == LoadBalancingConfig(
        decay=10.0, default_rtt=0.030, prefer_same_node=False
    )
    assert (service.retry_budget.retry_ratio, service.retry_budget.min_retries_per_second) == (0.2, 10.0)
    assert service.retry_budget.window == 10.0
    od = service.outlier_detection
    assert (od.consecutive_5xx, od.consecutive_gateway_failures, od.base_ejection_time) == (5, 5, 30.0)
    assert (od.max_ejection_time, od.max_ejection_percent, od.interval) == (300.0, 10.0, 10.0)
    cb = service.circuit_breakers
    assert (cb.max_connections, cb.max_pending_requests, cb.max_requests, cb.max_retries) == (
        1_000_000,
        1_000_000,
        1_000_000,
        1_000_000,
    )
    assert service.rate_limit is None
    route = RouteResilience()
    assert route.timeout == 15.0 and route.honor_caller_timeout and route.fault is None
    policy = route.retries.policy()
    assert policy.max_retries == 2 and policy.retriable_status_codes == {503}
    assert policy.retry_on == {
        RetryOn.CONNECT_FAILURE,
        RetryOn.REFUSED_STREAM,
        RetryOn.UNAVAILABLE,
        RetryOn.CANCELLED,
        RetryOn.RETRIABLE_STATUS_CODES,
    }
    assert (policy.backoff_base, policy.backoff_max, policy.max_replay_body) == (0.025, 0.25, 65536)
    assert policy.per_try_timeout is None


def test_durations_take_the_config_forms() -> None:
    route = RouteResilience.model_validate(
        {
            "timeout": "200ms",
            "retries": {"per_try_timeout": "1.5s", "backoff_base": 0.01, "backoff_max": "1s"},
        }
    )
    assert route.timeout == 0.2 and route.retries.per_try_timeout == 1.5
    assert route.retries.backoff_base == 0.01 and route.retries.backoff_max == 1.0
    assert RouteResilience.model_validate({"timeout": 0}).timeout == 0.0  # off


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        (RouteResilience, {"timeout": "0.5ms"}, "at least 1ms"),
        (RouteResilience, {"timeout": True}, "not a boolean"),
        (RouteResilience, {"timeout": "2d"}, "unit"),
        (RouteResilience, {"timeout": "2h", "x": 1}, "Extra inputs"),
        (RouteResilience, {"timeout": "25h"}, "at most 86400"),
        (RetryConfig, {"max_retries": "2"}, "valid integer"),
        (RetryConfig, {"max_retries": 11}, "less than or equal to 10"),
        (RetryConfig, {"retry_on": ["5xx", "teapot"]}, "retry_on"),
        (RetryConfig, {"retry_on": []}, "at least 1"),
        (RetryConfig, {"backoff_base": "1s", "backoff_max": "100ms"}, "below backoff_base"),
        (RetryConfig, {"retriable_status_codes": []}, "retriable_status_codes is empty"),
        (RetryConfig, {"retriable_status_codes": [600]}, "less than or equal to 599"),
        (RetryConfig, {"per_try_timeout": "0.1ms"}, r"0 \(off\) or at least 1ms"),
        (LoadBalancingConfig, {"default_rtt": 0}, "at least 1ms"),
        (OutlierDetectionConfig, {"base_ejection_time": "60s", "max_ejection_time": "30s"}, "below base"),
        (OutlierDetectionConfig, {"max_ejection_percent": 101}, "less than or equal to 100"),
        (OutlierDetectionConfig, {"consecutive_5xx": -1}, "greater than or equal to 0"),
        (CircuitBreakersConfig, {"max_requests": 1.5}, "valid integer"),
        (RetryBudgetConfig, {"retry_ratio": -0.1}, "greater than or equal to 0"),
        (RateLimitConfig, {"requests_per_second": 0}, "greater than 0"),
        (RateLimitConfig, {"requests_per_second": 10, "burst": 0}, "greater than or equal to 1"),
        (FaultConfig, {}, "needs a delay, an abort or both"),
        (FaultConfig, {"abort": {"status": 99}}, "greater than or equal to 200"),
        (FaultConfig, {"abort": {"status": 503, "grpc_status": 17}}, "less than or equal to 16"),
        (FaultConfig, {"delay": {"duration": "1s", "percent": 150}}, "less than or equal to 100"),
        (HeaderConditionConfig, {"name": "bad name"}, "token characters"),
        (HeaderConditionConfig, {"name": "x", "exact": "a", "regex": "b"}, "at most one"),
        (HeaderConditionConfig, {"name": "x", "regex": "(a"}, "invalid RE2 regex"),
    ],
)
def test_bad_values_are_refused_with_a_reason(model: Any, data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        model.model_validate(data)


def test_models_are_frozen() -> None:
    with pytest.raises(ValidationError, match="frozen"):
        RouteResilience().timeout = 1.0  # type: ignore[misc]


def test_runtime_objects() -> None:
    service = ServiceResilience.model_validate(
        {
            "outlier_detection": {"consecutive_5xx": 3, "max_ejection_percent": 50},
            "circuit_breakers": {"max_requests": 10},
            "rate_limit": {"requests_per_second": 100.5},
            "retry_budget": {"retry_ratio": 0.5, "min_retries_per_second": 0, "window": "2s"},
        }
    )
    assert service.outlier_detection.settings().consecutive_5xx == 3
    assert service.outlier_detection.settings().max_ejection_percent == 50.0
    assert service.circuit_breakers.limits().max_requests == 10
    bucket = service.rate_limit.bucket()  # type: ignore[union-attr]
    assert (bucket.requests_per_second, bucket.burst) == (100.5, 101)
    budget = service.retry_budget.budget()
    assert (budget.retry_ratio, budget.reserve, budget.window) == (0.5, 0.0, 2.0)
    assert RateLimitConfig(requests_per_second=0.2).bucket().burst == 1
    fault = FaultConfig.model_validate(
        {
            "delay": {"duration": "100ms", "percent": 5},
            "abort": {"status": 503, "grpc_status": 14},
            "headers": [{"name": "X-Chaos", "exact": "on"}, {"name": "x-build", "regex": "[0-9]+"}],
        }
    ).policy()
    assert (fault.delay, fault.delay_percent, fault.abort_status, fault.abort_grpc_status) == (
        0.1,
        5.0,
        503,
        14,
    )
    assert fault.abort_percent == 100.0 and fault.header_names == {"x-chaos", "x-build"}
    assert fault.headers[1].regex is not None and fault.headers[1].test({"x-build": "12"})


SERVICE_YAML = """
node: {name: node-a}
capture: {pod_cidrs: ["10.244.1.0/24"]}
services:
  - name: reviews
    vip: 10.96.0.20
    ports: [{port: 80, target_port: 9080, protocol: http}]
    balancer: peak_ewma
    endpoints: [{address: 10.244.1.10}, {address: 10.244.1.11}]
    resilience:
      load_balancing: {prefer_same_node: true}
      outlier_detection: {consecutive_5xx: 3, base_ejection_time: 10s}
      rate_limit: {requests_per_second: 2000}
    routes:
      - name: api
        resilience:
          timeout: 2s
          retries: {max_retries: 3, retry_on: [reset, gateway-error], per_try_timeout: 500ms}
          fault: {abort: {status: 503, percent: 5}, headers: [{name: x-chaos, exact: "on"}]}
"""


def test_hooked_into_the_service_and_route_config() -> None:
    from nodeproxy.config import parse_config

    config = parse_config(SERVICE_YAML)
    service = config.services[0]
    assert service.balancer == "peak_ewma"
    assert service.resilience.load_balancing.prefer_same_node
    assert service.resilience.outlier_detection.base_ejection_time == 10.0
    assert service.resilience.circuit_breakers.max_requests == 1_000_000  # default
    route = service.routes[0].resilience
    assert route.timeout == 2.0 and route.retries.per_try_timeout == 0.5
    assert route.fault is not None and route.fault.policy().abort_percent == 5.0
    # Omitted everywhere: the defaults.
    bare = parse_config(SERVICE_YAML.replace("balancer: peak_ewma", "")).services[0]
    assert bare.balancer == "peak_ewma"


def test_config_errors_point_at_the_resilience_key() -> None:
    from nodeproxy.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(SERVICE_YAML.replace("per_try_timeout: 500ms", "per_try_timeout: 0.1ms"))
    text = str(err.value)
    assert "services[0].routes[0].resilience.retries.per_try_timeout" in text and "1ms" in text
