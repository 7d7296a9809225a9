"""Property-based checks of the OpenAPI schema (schemathesis): no 5xx, responses match it."""

from __future__ import annotations

import tempfile

from hypothesis import HealthCheck, settings

from tests.fakes import make_client
from tests.helpers import require

schemathesis = require("schemathesis")  # under CI=true a missing schemathesis fails
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    response_schema_conformance,
)

client, store, dispatcher = make_client(tempfile.mkdtemp(prefix="shardgrad-schema-"))
schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
routes = schema.include(
    path_regex=r"^/api/v1/(jobs(/\{job_id\}(/(predict|cancel|metrics))?)?|cluster)$"
)


@routes.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
