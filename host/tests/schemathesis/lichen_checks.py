"""Schemathesis hooks and checks of our own, loaded with
SCHEMATHESIS_HOOKS=lichen_checks by host/tests/it/fuzz_api.rs.

Schemathesis' `not_a_server_error` fails on every 5xx. A function's own answer
may be a 5xx, and a trap is that request's 500 by design, so that check is
replaced by this one: a 5xx is a finding unless it is
- on an invocation (`/fn/...`): a trap (`trap`, `response_too_large`), the
  function's own answer (no host error code), or the documented busy (503)
  and deadline (504) errors;
- on a map: the documented 503 (`busy`, `policy_invalid`).
A host error answered as `internal` is always a finding.
"""
import json

import schemathesis

# Uploads are raw bytes, as schemathesis sends application/octet-stream; a
# policy is text.
schemathesis.serializer.alias("application/wasm", "application/octet-stream")
schemathesis.serializer.alias("application/toml", "text/plain")

# The example functions the test deploys and then calls: the admin run may
# fuzz every admin route, but not delete them or rewrite their policies.
EXAMPLES = {"hello", "echo", "square", "fib", "hash"}


@schemathesis.hook
def filter_path_parameters(ctx, path_parameters):
    operation = ctx.operation
    if operation is None or not operation.path.startswith("/v1/functions/{name}"):
        return True
    if operation.method.upper() not in ("DELETE", "PUT"):
        return True
    return (path_parameters or {}).get("name") not in EXAMPLES

ALLOWED_ON_INVOKE = {500: {"trap", "response_too_large"}, 503: {"busy", "policy_invalid"},
                     504: {"timeout", "peer_timeout"}}
ALLOWED_ON_MAP = {503: {"busy", "policy_invalid"}}
# Codes only the host answers with; a function's own 5xx carries none of them.
HOST_CODES = {"internal", "disk_full", "peer_failed", "trap", "response_too_large", "busy",
              "policy_invalid", "timeout", "peer_timeout"}


def host_code(response):
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(body, dict) and set(body) == {"error", "code"}:
        return body["code"]
    return None


@schemathesis.check
def no_host_failure(ctx, response, case):
    status = response.status_code
    if status < 500:
        return None
    path = case.operation.path
    code = host_code(response)
    if code == "internal":
        raise AssertionError(f"{status} internal error: {response.content[:500]!r}")
    if path.startswith("/fn/"):
        if code is None or code not in HOST_CODES:
            return None  # the function's own answer
        if code in ALLOWED_ON_INVOKE.get(status, ()):
            return None
    elif path.endswith("/map") and code in ALLOWED_ON_MAP.get(status, ()):
        return None
    raise AssertionError(f"unexpected {status} (code {code!r}) on {case.method} {path}: "
                         f"{response.content[:500]!r}")
