"""`idx serve`'s promises beyond search (issue 17): every error is {"error", "message",
"reason"} (validation errors, unknown parameters, routes and methods included), the OpenAPI
schema describes the image bodies, /docs loads nothing from a CDN (it is off, and says so), and
a filter that matches nothing says why. The real app over a real Edge store, in process."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fixtures import read_samples
from phisearch.indexer.store import StoreConfig
from phisearch.search.serve import create_app
from phisearch.search.serve_api import DOCS_NOTE

SHAPE = {"error", "message", "reason"}


@pytest.fixture(scope="module")
def client(mini_store: Path) -> Iterator[TestClient]:
    app = create_app(StoreConfig(path=str(mini_store)), warm=False)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def jpg(mini_shard: str) -> bytes:
    return read_samples(mini_shard, 1)[0][1]["jpg"]


def check(r, status: int, error: str, reason: str) -> dict:
    body = r.json()
    assert r.status_code == status, r.text
    assert SHAPE <= set(body) and "detail" not in body, body
    assert (body["error"], body["reason"]) == (error, reason), body
    assert isinstance(body["message"], str) and "\n" not in body["message"]
    return body


@pytest.mark.parametrize("params, param, reason", [
    ({"k": 0}, "k", "greater_than_equal"),
    ({"k": "abc"}, "k", "int_parsing"),
    ({"k": 1001}, "k", "less_than_equal"),
    ({"label": 2**63}, "label", "less_than_equal"),
    ({"cluster": "x"}, "cluster", "int_parsing"),
])
def test_validation_errors_use_the_error_shape(client, jpg, params, param, reason):
    body = check(client.post("/search", params=params, content=jpg), 422, "invalid_request",
                 reason)
    assert body["param"] == param and body["message"].startswith(f"{param}: ")


def test_unknown_query_parameters_are_errors(client, jpg):
    body = check(client.post("/search", params={"k": 3, "lable": 3}, content=jpg), 422,
                 "invalid_request", "unknown_parameter")
    assert body["param"] == "lable"
    assert body["message"] == ("unknown query parameter(s) lable (known: k, label, cluster, "
                               "dataset, id)")
    check(client.post("/phi", params={"sigma": 0.1}, content=jpg), 422, "invalid_request",
          "unknown_parameter")
    check(client.get("/healthz", params={"verbose": 1}), 422, "invalid_request",
          "unknown_parameter")
    assert client.post("/search", params={"k": 3}, content=jpg).status_code == 200


def test_routes_methods_and_our_own_errors_use_the_shape(client, jpg):
    body = check(client.get("/nope"), 404, "not_found", "no_route")
    assert body["message"] == "Not Found: GET /nope (see / for the endpoints)"
    check(client.get("/search"), 405, "method_not_allowed", "method")
    check(client.post("/search", content=b"not an image at all"), 400, "bad_image",
          "not_an_image")
    body = check(client.post("/search", params={"id": "nope"}), 404, "not_found",
                 "no_such_point")
    assert body["message"] == "no point with id nope: point ids are UUIDs"
    check(client.post("/search", params={"id": "00000000-0000-0000-0000-000000000000"}), 404,
          "not_found", "no_such_point")
    check(client.post("/phi", content=b"x" * 64, headers={
        "content-type": "multipart/form-data; boundary=zz"}), 400, "bad_form",
        "malformed_multipart")
    check(client.post("/phi", files={"note": (None, "no file here")}), 400, "no_file",
          "no_file_field")


def test_no_collection_and_an_unhealthy_store_use_the_shape(tmp_path, jpg, mini_store):
    root = tmp_path / "store"
    shutil.copytree(mini_store, root)
    app = create_app(StoreConfig(path=str(root), collection="photos"), warm=False)
    with TestClient(app) as c:
        r = c.get("/healthz")
        body = check(r, 503, "no_collection", "not_built")
        assert body["status"] == "unhealthy"
        assert body["message"].startswith(f"no collection photos in store {root} (known: "
                                          "phisearch)")
        check(c.post("/search", content=jpg), 503, "no_collection", "not_built")


def test_the_schema_describes_the_image_bodies(client):
    spec = client.get("/openapi.json").json()
    for path, required in (("/phi", True), ("/search", False)):
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is required, path
        content = body["content"]
        assert content["image/*"]["schema"] == {"type": "string", "format": "binary"}
        form = content["multipart/form-data"]["schema"]
        assert form["properties"]["file"] == {"type": "string", "format": "binary"}
    params = {p["name"] for p in spec["paths"]["/search"]["post"]["parameters"]}
    assert params == {"k", "label", "cluster", "dataset", "id"}


def test_docs_pages_load_nothing_from_a_cdn(client):
    """FastAPI's /docs and /redoc pull Swagger UI / ReDoc from a CDN: off, and `/` says so."""
    body = check(client.get("/docs"), 404, "not_found", "docs_off")
    assert body["message"] == DOCS_NOTE
    check(client.get("/redoc"), 404, "not_found", "no_route")
    index = client.get("/").json()
    assert index["docs"] == DOCS_NOTE and index["openapi"] == "/openapi.json"
    assert set(index["endpoints"]) == {"GET /healthz", "POST /phi", "POST /search"}
    assert "cdn" not in client.get("/openapi.json").text.lower()


def test_a_filter_that_matches_nothing_says_why(client, jpg):
    r = client.post("/search", params={"k": 5, "cluster": 0}, content=jpg)
    assert r.status_code == 200 and r.json()["hits"] == []
    assert r.json()["why_empty"] == ("cluster 0 cannot match: the collection is not clustered "
                                     "yet (run `idx cluster`)")
    r = client.post("/search", params={"k": 5, "label": 3}, content=jpg)
    assert r.status_code == 200 and len(r.json()["hits"]) == 5 and "why_empty" not in r.json()
