"""The OpenAPI document tells the truth: schemathesis, with its default checks, finds no failure against the app on
the fake pipeline, and the document declares each dialect's errors, the API-key schemes and the configured limits.

The schemathesis runs are bounded (a fixed number of examples per operation, derandomized, no example database),
so they repeat exactly and take well under a minute. One check is left out for four operations, see
`IMAGE_OPERATIONS`.
"""

from __future__ import annotations

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from server_fakes import FakePipe

from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

KEY = "schema-key"
# Small limits keep the fake's images small; queue_size leaves room, since requests here run one at a time.
LIMITS = dict(
    max_width=128, max_height=96, max_images=4, max_batch=2, max_steps=4, queue_size=8, model_name="tiny"
)
EXAMPLES = 25  # per operation and generation phase

# These take an image: JSON Schema can say "base64 text" or "a file", but not "a decodable image of a size within
# the limits", so a schema-valid random string is rightly refused with 400. positive_data_acceptance (schema-valid
# data must get 2xx) cannot hold for them; every other check, negative data included, still runs on them.
IMAGE_OPERATIONS = {"/sdapi/v1/img2img", "/sdapi/v1/png-info", "/v1/images/edits", "/controlnet/detect"}


def _schema(settings: Settings) -> schemathesis.schemas.BaseSchema:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(FakePipe(), settings))
    schema.config.generation.update(
        max_examples=EXAMPLES, deterministic=True, database="none", with_security_parameters=False
    )
    return schema


keyed_refusing = _schema(Settings(**LIMITS, api_key=KEY))
open_lenient = _schema(Settings(**LIMITS, unsupported="warn"))


def _check(case: schemathesis.Case, headers: dict[str, str] | None = None) -> None:
    excluded = [positive_data_acceptance] if case.path in IMAGE_OPERATIONS else []
    case.call_and_validate(headers=headers, excluded_checks=excluded)


@keyed_refusing.parametrize()
@hypothesis_settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_nothing_with_a_key_and_refusals(case: schemathesis.Case) -> None:
    """Default policy ("refuse") and an API key: `ignored_auth` also checks that each secured operation refuses
    requests without the key."""
    _check(case, {"Authorization": f"Bearer {KEY}"})


@open_lenient.parametrize()
@hypothesis_settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_nothing_open_and_lenient(case: schemathesis.Case) -> None:
    """No key (the API is open, and the document says so) and `unsupported="warn"`: fields are wider."""
    _check(case)


# ----------------------------------------------------------------------------------------------------------------------
# What the document says


def document(**settings) -> dict:
    with TestClient(create_app(FakePipe(), Settings(**{**LIMITS, **settings}))) as c:
        return c.get("/openapi.json").json()


def test_security_schemes_are_declared_when_a_key_is_set() -> None:
    doc = document(api_key=KEY)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["HTTPBearer"]["description"],
    }
    assert (schemes["APIKeyHeader"]["type"], schemes["APIKeyHeader"]["in"], schemes["APIKeyHeader"]["name"]) == (
        "apiKey", "header", "X-API-Key",
    )  # fmt: skip
    for path in ("/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img", "/sdapi/v1/loras"):
        operation = next(iter(doc["paths"][path].values()))
        assert operation["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}], path  # either one
        assert "401" in operation["responses"]
    assert "security" not in doc["paths"]["/health"]["get"]  # open: the page polls it before it has a key
    open_doc = document()
    assert "securitySchemes" not in open_doc["components"]
    assert all(
        "security" not in op and "401" not in op["responses"]
        for m in open_doc["paths"].values()
        for op in m.values()
    )


def test_each_dialect_declares_its_error_body() -> None:
    doc = document(api_key=KEY)
    for path, methods in doc["paths"].items():
        for operation in methods.values():
            responses = operation["responses"]
            expected = "OpenAIError" if path.startswith("/v1/") else "A1111Error"
            for status in ("400", "401", "413", "503"):
                schema = responses[status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{expected}"}, (path, status)
            assert ("422" in responses) == (
                not path.startswith("/v1/") and "requestBody" in operation
            ) or "parameters" in operation
    assert doc["components"]["schemas"]["OpenAIError"]["required"] == ["error"]
    assert "422" not in doc["paths"]["/v1/images/generations"]["post"]["responses"]  # OpenAI answers 400
    reply = doc["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]
    assert reply == {"$ref": "#/components/schemas/A1111ImagesResponse"}


def test_limits_and_policy_are_in_the_request_schemas() -> None:
    doc = document()
    txt2img = doc["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert txt2img["width"]["anyOf"][0] == {"type": "integer", "multipleOf": 8, "minimum": 64, "maximum": 128}
    assert txt2img["height"]["anyOf"][0]["maximum"] == 96 and txt2img["steps"]["maximum"] == 4
    assert {"enum": [False, None]} in txt2img["enable_hr"]["allOf"]
    openai = doc["components"]["schemas"]["OpenAIImageRequest"]
    assert openai["additionalProperties"] is False
    pattern = openai["properties"]["size"]["anyOf"][0]["pattern"]
    import re

    assert re.fullmatch(pattern, "128x96") and re.fullmatch(pattern, "auto")
    assert not any(re.fullmatch(pattern, s) for s in ("136x96", "128x104", "60x64", "56x64", "64"))
    lenient = document(unsupported="warn")
    assert "allOf" not in lenient["components"]["schemas"]["Txt2ImgRequest"]["properties"]["enable_hr"]
    assert lenient["components"]["schemas"]["OpenAIImageRequest"]["additionalProperties"] is not False


def test_auth_behaviour_is_unchanged_by_the_security_dependencies() -> None:
    with TestClient(create_app(FakePipe(), Settings(api_key=KEY))) as c:
        assert c.get("/sdapi/v1/sd-models").status_code == 401
        assert c.get("/sdapi/v1/sd-models", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/sdapi/v1/sd-models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        assert c.get("/sdapi/v1/sd-models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    with TestClient(create_app(FakePipe(), Settings())) as c:
        assert c.get("/sdapi/v1/sd-models").status_code == 200  # no key configured: open
