"""A WASIp3 (wasi:http/service@0.3.0) component written in Python with
componentize-py, as a component from a toolchain other than ours: it answers
what it received (method, path, headers, body length) as JSON.

Built by functions/build.sh:
    componentize-py -d WIT -w wasi:http/service@0.3.0 componentize app -o echo_py.wasm
"""
import json

import componentize_py_async_support
import wit_world
from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.wasi_http_types import Fields, Request, Response

METHODS = {
    "Method_Get": "GET", "Method_Head": "HEAD", "Method_Post": "POST", "Method_Put": "PUT",
    "Method_Delete": "DELETE", "Method_Connect": "CONNECT", "Method_Options": "OPTIONS",
    "Method_Trace": "TRACE", "Method_Patch": "PATCH",
}


class Handler(exports.Handler):
    async def handle(self, request: Request) -> Response:
        kind = type(request.get_method()).__name__
        method = METHODS.get(kind) or request.get_method().value
        path = request.get_path_with_query() or "/"
        headers = [[name, value.decode("latin-1")] for name, value in request.get_headers().copy_all()]
        done_tx, done_rx = wit_world.result_unit_wasi_http_types_error_code_future(lambda: Ok(None))
        contents, _trailers = Request.consume_body(request, done_rx)
        body = bytearray()
        with contents:
            while not contents.writer_dropped:
                body += await contents.read(64 * 1024)
        answer = json.dumps({
            "method": method,
            "uri": path,
            "headers": headers,
            "body_len": len(body),
            "language": "python",
        }).encode()

        out_tx, out_rx = wit_world.byte_stream()
        trailers_tx, trailers_rx = (
            wit_world.result_option_wasi_http_types_fields_wasi_http_types_error_code_future(lambda: Ok(None))
        )
        response, _sent = Response.new(
            Fields.from_list([("content-type", b"application/json")]), out_rx, trailers_rx
        )

        async def write_body():
            with out_tx:
                written = 0
                while written < len(answer) and not out_tx.reader_dropped:
                    written += await out_tx.write(answer[written:])
            # No trailers: the writer goes, and the reader gets the default.
            with trailers_tx:
                pass

        componentize_py_async_support.spawn(write_body())
        return response
