"""Schemathesis against the app's own OpenAPI document, on the embedded default with keys required: every
operation gets generated valid and invalid requests; no answer may be a 5xx, and every answer must match the
schema. A schema-valid request may still be refused with a 422 where a rule spans fields (min_drop <= max_drop,
a cron that fires, a job's total size): that check is left out. Then the document's links are followed from a
created job and entry to every operation they name, which must find them."""

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from app.core.auth import create_key
from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app

# Bounded, so the suite stays within its time budget: enough to reach every branch of validation.
EXAMPLES_PER_OPERATION = 30
HYPOTHESIS = dict(deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.function_scoped_fixture])

upgrade()
app = create_app(auth_disabled=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
JOB = {"model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}}


@pytest.fixture(scope="module")
def key() -> str:
    with session_scope() as session:
        return create_key(session, "fuzz")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, **HYPOTHESIS)
def test_every_operation_answers_without_5xx_and_within_its_schema(case, key):
    case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, excluded_checks=[positive_data_acceptance])


def _operations(document: dict) -> dict[str, tuple[str, str]]:
    return {operation["operationId"]: (method, path) for path, methods in document["paths"].items()
            for method, operation in methods.items()}


@pytest.mark.parametrize("create, body, status", [
    ("POST /v1/jobs", JOB, "202"),
    ("POST /v1/registry", {**JOB, "schedule": {"interval_seconds": 3600}}, "201"),
])
def test_the_documents_links_lead_from_a_created_resource_to_operations_that_find_it(key, create, body, status):
    client = TestClient(app, base_url="http://127.0.0.1")
    headers = {"Authorization": f"Bearer {key}"}
    document = client.get("/openapi.json").json()
    operations = _operations(document)
    method, path = create.split(" ")
    links = document["paths"][path][method.lower()]["responses"][status]["links"]
    created = client.request(method, path, json=body, headers=headers)
    assert created.status_code == int(status), created.text
    assert {"get_job", "cancel_job"} <= set(links) or {"get_entry", "run_now", "delete_entry"} <= set(links)
    # Deleting last: every other link must still find the resource.
    for name, link in sorted(links.items(), key=lambda item: item[0].startswith("delete")):
        (parameter, expression), = link["parameters"].items()
        value = created.json()[expression.removeprefix("$response.body#/")]
        link_method, link_path = operations[link["operationId"]]
        answer = client.request(link_method, link_path.replace("{" + parameter + "}", value), headers=headers,
                                json={} if link_method == "patch" else None)  # an empty patch changes nothing
        assert answer.status_code not in (404, 422) and answer.status_code < 500, (name, answer.text)
