"""Schemathesis hooks for the hangar control API (see schemathesis.toml)."""

import os

import schemathesis

# A deploy uploads a gzipped tar. Schemathesis generates arbitrary bytes for the body
# (`format: binary`); they go out as they are, like any binary upload.
schemathesis.serializer.alias("application/gzip", "application/octet-stream")

# The id of the key the run authenticates with (the test sets it).
OWN_KEY_ID = os.environ.get("HANGAR_OPENAPI_KEY_ID", "")


@schemathesis.hook
def before_call(context, case, kwargs):
    """Never revoke the key the run authenticates with: every later call would be
    refused, and the run would test nothing but authentication."""
    if (
        OWN_KEY_ID
        and case.method.upper() == "DELETE"
        and case.path == "/v1/keys/{id}"
        and case.path_parameters
        and case.path_parameters.get("id") == OWN_KEY_ID
    ):
        case.path_parameters["id"] = "not-the-run-s-own-key"
