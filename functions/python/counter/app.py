"""A visit counter in Python: a WASIp3 (wasi:http/service@0.3.0) component
that also imports wasi:keyvalue@0.2.0-draft, built by componentize-py, to
show a component from another toolchain keeping state unmodified. Each
request adds one to its path's counter in the store named by `?store=`
(default `default`) and answers the count as JSON; a store error is a 422
that names it.

Built by functions/build.sh against its own world (`wit/world.wit`):
    componentize-py -d WIT -d host/wit/keyvalue-0.2.0-draft -d wit \
        -w lichen:counter-py/app componentize app -o counter_py.wasm
"""
import json
from urllib.parse import parse_qs, urlsplit

import componentize_py_async_support
import wit_world
from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import atomics, store
from wit_world.imports.wasi_http_types import Fields, Response


def count(path_with_query: str):
    url = urlsplit(path_with_query)
    label = parse_qs(url.query).get("store", ["default"])[0]
    try:
        bucket = store.open(label)
        visits = atomics.increment(bucket, "visits:" + url.path, 1)
        return 200, {"path": url.path, "visits": visits, "language": "python"}
    except Err as err:
        error = err.value
        kind = type(error).__name__.removeprefix("Error_")
        message = getattr(error, "value", "")
        return 422, {"error": kind, "message": message, "language": "python"}


class Handler(exports.Handler):
    async def handle(self, request) -> Response:
        status, answer = count(request.get_path_with_query() or "/")
        body = json.dumps(answer).encode()
        out_tx, out_rx = wit_world.byte_stream()
        trailers_tx, trailers_rx = (
            wit_world.result_option_wasi_http_types_fields_wasi_http_types_error_code_future(lambda: Ok(None))
        )
        response, _sent = Response.new(
            Fields.from_list([("content-type", b"application/json")]), out_rx, trailers_rx
        )
        response.set_status_code(status)

        async def write_body():
            with out_tx:
                written = 0
                while written < len(body) and not out_tx.reader_dropped:
                    written += await out_tx.write(body[written:])
            with trailers_tx:
                pass

        componentize_py_async_support.spawn(write_body())
        return response
