"""The OpenAPI document against what the server answers: every status each route can give, the limits it enforces,
and a property-based fuzzer (schemathesis) run from the document itself."""

from __future__ import annotations

import pytest
from test_serve_logprobs import BASE, httpx, served  # noqa: F401  (served: a fixture)
from waiting import HANG_GUARD_S


def test_openapi_declares_every_status_and_the_limits_the_server_enforces(served):  # noqa: F811
    from tinylora.serve.app import ROUTE_ERRORS
    schema = httpx.get(served.url.removesuffix("/v1") + "/openapi.json", timeout=HANG_GUARD_S).json()
    routes = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    assert routes == {("/health", "get"), ("/v1/models", "get"), ("/v1/completions", "post"),
                      ("/v1/chat/completions", "post"), ("/v1/load_lora_adapter", "post"),
                      ("/v1/unload_lora_adapter", "post")}
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    seen = set()
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"]) - {"200"}
            assert "422" not in codes  # the server answers 400 for what fails validation, never 422
            assert codes == {str(c) for c in ROUTE_ERRORS[path]}, path
            for code in codes:
                assert op["responses"][code]["content"]["application/json"]["schema"] == error, (path, code)
            if method == "post":
                assert {"400", "401", "411", "413", "500"} <= codes, path
            seen |= codes
    assert seen >= {"400", "401", "403", "404", "411", "413", "429", "500"}
    assert "/v1/completions" in schema["paths"] and "HTTPValidationError" not in schema["components"]["schemas"]
    defs = schema["components"]["schemas"]
    assert set(defs["ErrorResponse"]["properties"]) == {"error"}
    assert set(defs["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    for name in ("CompletionRequest", "ChatRequest"):
        props = defs[name]["properties"]
        assert props["model"]["minLength"] == 1
        number = lambda p: next(x for x in props[p].get("anyOf", [props[p]]) if x.get("type") != "null")  # noqa
        assert number("temperature")["minimum"] == 0 and number("temperature")["maximum"] == 2
        assert number("top_p")["exclusiveMinimum"] == 0 and number("top_p")["maximum"] == 1
        assert number("n")["minimum"] == 1
        assert number("max_tokens")["minimum"] == (0 if name == "CompletionRequest" else 1)
    props = defs["CompletionRequest"]["properties"]
    assert next(x for x in props["logprobs"]["anyOf"] if x["type"] == "integer") == {
        "type": "integer", "minimum": 0, "maximum": 5}
    stop_list = next(x for x in props["stop"]["anyOf"] if x.get("type") == "array")
    assert stop_list["maxItems"] == 16 and stop_list["items"]["minLength"] == 1
    assert defs["UnloadAdapterRequest"]["properties"]["lora_name"]["minLength"] == 1


@pytest.mark.parametrize("field, value", [
    ("model", ""), ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("n", 0),
    ("max_tokens", -1), ("logprobs", 6), ("stop", [""]), ("stop", [f"s{i}" for i in range(17)]), ("prompt", []),
    ("prompt", [-1]), ("prompt", [[]]), ("seed", 2 ** 64),
])
def test_what_the_schema_rejects_gets_a_400(served, field, value):  # noqa: F811
    out = served.post({"model": BASE, "prompt": "t20", "max_tokens": 1, field: value}, status=400)
    assert out["error"]["param"].split(".")[0] == field and out["error"]["type"] == "invalid_request_error"


def test_a_chat_request_and_an_unload_with_an_empty_name_get_a_400(served):  # noqa: F811
    out = served.post({"model": "", "messages": [{"role": "user", "content": "t20"}]}, route="/chat/completions",
                      status=400)
    assert out["error"]["param"] == "model"
    assert served.post({"lora_name": ""}, route="/unload_lora_adapter", status=400)["error"]["param"] == "lora_name"


def test_schemathesis_finds_no_undeclared_status_and_no_off_schema_error(served, tmp_path):  # noqa: F811
    """Requests generated from /openapi.json (valid ones and ones it rejects) against the running server: no 500,
    no status a route does not declare, every error body of the declared schema, what the schema rejects a 4xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.configuration import set_hypothesis_home_dir
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis import checks as st_checks

    checks = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
              st_checks.response_schema_conformance, st_checks.negative_data_rejection]
    schema = schemathesis.openapi.from_url(served.url.removesuffix("/v1") + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 6
    set_hypothesis_home_dir(tmp_path / "hypothesis")  # its caches: not a .hypothesis folder in the work tree
    try:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
                def run(case):
                    case.call_and_validate(checks=checks)

                try:
                    run()
                except Unsatisfiable:  # nothing to get wrong: /health takes no input
                    assert mode == GenerationMode.NEGATIVE and operation.path == "/health"
    finally:
        set_hypothesis_home_dir(None)
