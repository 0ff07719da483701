"""Fuzz the REST API from its own OpenAPI schema (Schemathesis): whatever a client sends, the
answer is never a 5xx, every error is ``{error, detail}`` JSON, and every answer matches the
schema (its status code, content type and body)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from busdx.serving import ServeSettings, create_app

from conftest import FAST, train_run

EXAMPLES = 40  # per operation: bounded so that CI stays within its budget


@pytest.fixture(scope="module")
def app(synthetic_data, tmp_path_factory):
    run = train_run(synthetic_data, tmp_path_factory.mktemp("fuzz") / "run", *FAST, epochs=1)
    return create_app(run, ServeSettings(max_upload_mb=1.0, max_pixels=4_000_000))


OPERATIONS = [("/predict", "POST"), ("/explain", "POST"), ("/health", "GET"), ("/model", "GET")]


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_schema_describes_every_operation(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    described = {(op.path, op.method.upper()) for op in operations}
    assert described == set(OPERATIONS)


FUZZED = [
    (path, method, mode)
    for path, method in OPERATIONS
    for mode in ("positive", "negative")
    if method == "POST" or mode == "positive"
]  # a GET without parameters has no negatives


@pytest.mark.parametrize(("path", "method", "mode"), FUZZED)
def test_no_server_error_and_errors_are_json(api_schema, path, method, mode):
    # Schemathesis' own pytest loader does not run under pytest 9: drive its strategies directly
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=api_schema[path][method].as_strategy(schemathesis.GenerationMode(mode)))
    def check(case):
        response = case.call()
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()) == {"error", "detail"}, response.text
        # any bytes fit "format: binary", so a 400 for a non-image is right, not a failure;
        # and a request outside the schema may still be served (an extra form field)
        case.validate_response(
            response,
            excluded_checks=[checks.positive_data_acceptance, checks.negative_data_rejection],
        )

    check()
