"""Schemathesis hooks for scripts/test.sh: keep long polls short.

`?wait_ms` and a reserve's `timeout_ms` may ask the server to hold a
request for up to 30 s, which is valid input but would spend the whole
time budget of the run waiting. They are capped here, not in the
document, which states the server's real bounds.
"""

import schemathesis

# Longest wait a generated request may ask for, in milliseconds.
WAIT_CAP_MS = 50


def _capped(value):
    if isinstance(value, int) and not isinstance(value, bool) and value > WAIT_CAP_MS:
        return WAIT_CAP_MS
    return value


@schemathesis.hook
def map_query(context, query):
    if isinstance(query, dict) and "wait_ms" in query:
        query["wait_ms"] = _capped(query["wait_ms"])
    return query


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict) and "timeout_ms" in body:
        body["timeout_ms"] = _capped(body["timeout_ms"])
    return body
