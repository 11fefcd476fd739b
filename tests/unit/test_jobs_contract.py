"""The batch endpoint's body and URIs: every catalog form taken, every bad one a 4xx naming
the field, nothing outside the allowed roots, no credentials kept."""

from __future__ import annotations

import re
from typing import Any

import pytest

from blipserve.contracts.batch_jobs import JobSpec, parse_job_request
from blipserve.errors import BlipserveError, Forbidden, InvalidInput
from blipserve.jobs.uris import UriResolver
from stores import AZURITE_ACCOUNT, AZURITE_KEY


def body(inputs: Any = None, outputs: Any = None, **extra: Any) -> dict[str, Any]:
    props: dict[str, Any] = {
        "InputData": inputs
        if inputs is not None
        else {"heart": {"JobInputType": "UriFolder", "Uri": "az://data/in/"}}
    }
    if outputs is not None:
        props["OutputData"] = outputs
    props.update(extra)
    return {"properties": props}


def test_the_catalogs_body_as_its_samples_send_it() -> None:
    spec = parse_job_request(
        body(outputs={"score": {"JobOutputType": "UriFile", "Uri": "az://data/out/p.csv"}})
    )
    assert spec == JobSpec("az://data/in/", "UriFolder", "az://data/out/p.csv", "UriFile")
    assert JobSpec.from_json(spec.to_json()) == spec
    # (no output: the server's default)
    assert parse_job_request(body()).output_uri is None


def test_our_options_are_checked_and_kept() -> None:
    extra = {"format": "jsonl", "text_from": "json:caption", "params": {"max_new_tokens": 9}}
    spec = parse_job_request(body(blipserve=extra))
    assert spec.overrides == extra
    assert spec.params.max_new_tokens == 9


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({}, "properties: required"),
        ({"properties": []}, "properties: expected an object"),
        ({"properties": {}}, "properties.InputData: required"),
        (body(inputs={}), "properties.InputData: a deployment of this model takes exactly one"),
        (
            body(
                inputs={
                    "a": {"JobInputType": "UriFolder", "Uri": "/x"},
                    "b": {"JobInputType": "UriFolder", "Uri": "/y"},
                }
            ),
            "exactly one; got 2 ('a', 'b')",
        ),
        (
            body(inputs={"a": {"JobInputType": "Literal", "Uri": "/x"}}),
            "properties.InputData.a.JobInputType: expected UriFolder or UriFile; got 'Literal'",
        ),
        (body(inputs={"a": {"JobInputType": "UriFolder"}}), "properties.InputData.a.Uri: required"),
        (
            body(inputs={"a": {"JobInputType": "UriFolder", "Uri": "/x", "Mystery": 1}}),
            "properties.InputData.a: unknown field 'Mystery'",
        ),
        (
            body(outputs={"o": {"JobInputType": "UriFolder", "Uri": "/x"}}),
            "properties.OutputData.o.JobOutputType: expected UriFolder or UriFile; missing",
        ),
        (body(blipserve={"overwrite": True}), "properties.blipserve.overwrite: unknown option"),
        (body(blipserve={"format": "xml"}), "properties.blipserve.format: expected an output"),
        (body(blipserve={"params": {"num_beams": "x"}}), "properties.blipserve.params"),
        (body(blipserve={"retry_errors": "yes"}), "properties.blipserve.retry_errors: expected"),
    ],
)
def test_bad_bodies_name_the_field(raw: Any, says: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_job_request(raw)
    assert says in caught.value.message


CONNECTION = (
    f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
    f"BlobEndpoint=http://127.0.0.1:10000/{AZURITE_ACCOUNT};"
)


def resolver(*roots: str, **options: Any) -> UriResolver:
    return UriResolver({"workspaceblobstore": "az://data"}, roots, options, env={})


@pytest.mark.parametrize(
    ("uri", "url"),
    [
        ("https://acct.blob.core.windows.net/data/in/x%20y", "az://data/in/x y"),
        ("https://acct.dfs.core.windows.net/data/in", "abfs://data/in"),
        ("azureml://datastores/workspaceblobstore/paths/in/", "az://data/in/"),
        (
            "azureml://subscriptions/s/resourcegroups/r/workspaces/w/datastores/"
            "workspaceblobstore/paths/batch/in",
            "az://data/batch/in",
        ),
        ("az://data/in", "az://data/in"),
        ("s3://bucket/in", "s3://bucket/in"),
        ("/srv/batch/in", "/srv/batch/in"),
    ],
)
def test_the_uris_clients_send(uri: str, url: str) -> None:
    assert resolver(account_name="acct").url(uri, "where") == url


def test_an_emulators_path_style_url_where_the_connection_string_names_it() -> None:
    r = resolver(connection_string=CONNECTION)
    url = f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}/data/in/a.jpg"
    assert r.url(url, "w") == "az://data/in/a.jpg"
    with pytest.raises(InvalidInput, match="not an Azure Storage URL"):
        r.url("http://127.0.0.1:9999/devstoreaccount1/data/in", "w")


@pytest.mark.parametrize(
    ("uri", "kind", "says"),
    [
        ("https://acct.blob.core.windows.net/data/in?sv=2024&sig=SECRET", InvalidInput, "SAS"),
        ("https://user:pw@acct.blob.core.windows.net/data/in", InvalidInput, "user name"),
        ("https://other.blob.core.windows.net/data/in", Forbidden, "'other'"),
        ("https://example.com/data/in", InvalidInput, "not an Azure Storage URL"),
        ("azureml://datastores/nope/paths/in", InvalidInput, "unknown datastore 'nope'"),
        ("azureml:heart-data:2", InvalidInput, "azureml://datastores/NAME/paths/PATH"),
        ("ftp://host/in", InvalidInput, "unsupported URI scheme"),
        ("az://data/in/../../secrets", InvalidInput, "'..'"),
    ],
)
def test_refused_uris(uri: str, kind: type[BlipserveError], says: str) -> None:
    with pytest.raises(kind) as caught:
        resolver("az://data", account_name="acct").url(uri, "properties.InputData.x.Uri")
    assert caught.value.message.startswith("properties.InputData.x.Uri: ")
    assert says in caught.value.message
    assert "SECRET" not in caught.value.message
    assert "pw" not in caught.value.message


def test_only_under_the_allowed_roots(tmp_path: Any) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "in").mkdir(parents=True)
    (tmp_path / "allowed-not").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link").symlink_to(allowed)
    (allowed / "escape").symlink_to(tmp_path / "elsewhere")
    r = resolver(str(allowed), "az://data/batch")
    assert str(r.locate(str(allowed / "in"), "w")) == str(allowed / "in")
    assert r.allowed("az://data/batch/in")
    assert r.allowed("abfs://data/batch/in/")
    assert r.allowed("az://data/batch")
    for refused in [
        str(tmp_path / "allowed-not"),  # a sibling whose name starts the same
        str(allowed / "escape"),  # a link out of the root
        "az://data/batchelor",
        "az://data",
        "s3://data/batch/in",
        "/etc",
    ]:
        assert not r.allowed(refused), refused
        if "://" not in refused:
            with pytest.raises(Forbidden, match="--jobs-allow-root"):
                r.locate(refused, "w")
    with pytest.raises(Forbidden):
        resolver().locate(str(allowed / "in"), "w")  # no root: nothing allowed


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("/r/in/{..,a}/{..,a}/secret/s.tar", "'..' segments"),
        ("/r/in/.{,x}./s.tar", "'..' segments"),
        ("az://data/batch/{0..999}{0..999}.tar", "more than 100000 files"),
        ("/r/in/{a,b", "unbalanced braces"),
    ],
)
def test_brace_patterns_are_checked_as_what_they_expand_to(uri: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(says)):
        resolver("/r", "az://data").url(uri, "w")
    assert resolver().url("/r/in/{00000..00009}.tar", "w") == "/r/in/{00000..00009}.tar"


def test_store_paths_with_dot_segments_match_no_root() -> None:
    r = resolver("s3://allowed")
    assert r.allowed("s3://allowed/x.jpg")
    assert not r.allowed("s3://allowed/../other/x.jpg")
    assert not r.allowed("s3://allowed/./x.jpg")


def test_the_job_table_is_no_jobs_even_under_a_root(tmp_path: Any) -> None:
    r = UriResolver({}, (str(tmp_path),), {}, (str(tmp_path / "jobs" / "jobs"),), env={})
    assert r.allowed(str(tmp_path / "data" / "x.jpg"))
    assert not r.allowed(str(tmp_path / "jobs" / "jobs" / "batchjob-1.json"))
    assert not r.guard.allowed(str(tmp_path / "jobs" / "jobs" / "batchjob-1.json"))


def test_blob_urls_need_the_servers_account() -> None:
    with pytest.raises(Forbidden, match="names no account"):
        resolver().url("https://acct.blob.core.windows.net/data/in", "w")
    assert resolver(account_name="ACCT").url("https://acct.blob.core.windows.net/c/p", "w") == (
        "az://c/p"
    )


def test_a_datastore_may_be_named_by_its_https_url() -> None:
    r = UriResolver(
        {"ws": "https://acct.blob.core.windows.net/data"}, (), {"account_name": "acct"}, env={}
    )
    assert r.url("azureml://datastores/ws/paths/in/", "w") == "az://data/in/"
