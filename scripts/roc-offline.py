"""Seed rocrate-validator's HTTP cache so that it validates offline, without skipping a check.

The validator (roc-validator, PyPI) resolves the RO-Crate JSON-LD context over the network.
This machine has none, so its HTTP cache (requests-cache, SQLite, what `--cache-path` names)
is given the context the `rocrate` package (PyPI) ships, under the context's URL; then
`rocrate-validator validate --offline --cache-path CACHE ...` reads it from there. The
shipped file is the RO-Crate 1.3 context, a later version of the same context: the terms
kliko's crates use (schema.org's Dataset, File, CreateAction, SoftwareApplication, ...) map to
the same IRIs in both.

    python scripts/roc-offline.py CACHE
"""

import importlib.resources
import io
import sys

import requests
import requests_cache
import urllib3

URLS = ["https://w3id.org/ro/crate/1.1/context"]


def seed(cache: str) -> None:
    session = requests_cache.CachedSession(cache_name=cache, backend="sqlite", expire_after=-1)
    body = (importlib.resources.files("rocrate") / "data" / "ro-crate.jsonld").read_bytes()
    for url in URLS:
        response = requests.Response()
        response.status_code = 200
        response._content = body
        response.url = url
        response.encoding = "utf-8"
        response.headers["Content-Type"] = "application/ld+json"
        response.request = requests.Request("GET", url).prepare()
        response.raw = urllib3.HTTPResponse(
            body=io.BytesIO(body),
            headers={"Content-Type": "application/ld+json"},
            status=200,
            preload_content=False,
            request_url=url,
        )
        session.cache.save_response(response)


if __name__ == "__main__":
    seed(sys.argv[1])
