"""``content-retry serve``: the HTTP API on localhost, through the detect handler.

``/docs`` is Swagger UI; callers are anonymous unless started with ``--dev-identity``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from functools import cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

from content_retry_local.lambda_runtime import invoke

DEV_USER_HEADER = "X-Dev-User"
REQUEST_TIMEOUT_SECONDS = 10
_HANDLER_TURN = threading.Lock()

ROUTES = (
    (
        "POST",
        re.compile(r"^/roadmaps/(?P<roadmap_id>[^/]+)/retry$"),
        "/roadmaps/{roadmap_id}/retry",
    ),
    ("GET", re.compile(r"^/retry-tasks/(?P<task_id>[^/]+)$"), "/retry-tasks/{task_id}"),
)

# Swagger UI, served from the Swagger UI files Powertools ships (its own
# enable_swagger() serves the same ones): no CDN, so /docs works offline, and
# no new dependency (Powertools is the layer's, pinned by its lock). Its 5.x
# renders OpenAPI 3.1, the version openapi_document() writes.
SWAGGER_UI_PACKAGE = "aws_lambda_powertools.event_handler.openapi.swagger_ui"
DOCS_FILES = {
    "/docs/swagger-ui.css": ("swagger-ui.min.css", "text/css; charset=utf-8"),
    "/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.min.js", "text/javascript; charset=utf-8"),
    "/docs/swagger-initializer.js": (None, "text/javascript; charset=utf-8"),
}
DOCS_PATHS = ("/", "/docs", "/openapi.json", *DOCS_FILES)

SWAGGER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>content-retry API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/swagger-initializer.js"></script>
<noscript>The OpenAPI document is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>
"""
# validatorUrl null: Swagger UI would otherwise send the document to
# validator.swagger.io for its badge.
SWAGGER_INITIALIZER = """window.ui = SwaggerUIBundle({
  url: "/openapi.json", dom_id: "#ui", validatorUrl: null, deepLinking: true
});
"""
# The page may load nothing from anywhere else (styles inline: Swagger UI sets some).
DOCS_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"


@cache
def docs_file(path: str) -> bytes:
    """The bytes of one of the Swagger UI files under /docs/."""
    name = DOCS_FILES[path][0]
    if name is None:
        return SWAGGER_INITIALIZER.encode()
    return (resources.files(SWAGGER_UI_PACKAGE) / name).read_bytes()


def api_gateway_event(
    method: str, raw_path: str, headers: dict[str, str], body: str | None, caller: str | None
) -> dict[str, Any]:
    """The REST proxy event API Gateway would send for this request."""
    path = urlsplit(raw_path).path
    resource, parameters = path, None
    for route_method, pattern, route_resource in ROUTES:
        match = pattern.match(path)
        if match and route_method == method:
            resource = route_resource
            parameters = {name: unquote(value) for name, value in match.groupdict().items()}
    context: dict[str, Any] = {
        "accountId": "000000000000",
        "apiId": "local",
        "httpMethod": method,
        "identity": {"sourceIp": "127.0.0.1", "userAgent": headers.get("User-Agent", "")},
        "path": path,
        "protocol": "HTTP/1.1",
        "requestId": str(uuid.uuid4()),
        "requestTimeEpoch": int(time.time() * 1000),
        "resourcePath": resource,
        "stage": "local",
    }
    if caller:
        context["authorizer"] = {"claims": {"sub": caller}}
    return {
        "resource": resource,
        "path": unquote(path),
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {name: [value] for name, value in headers.items()},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": parameters,
        "stageVariables": None,
        "requestContext": context,
        "body": body,
        "isBase64Encoded": False,
    }


class ApiRequestHandler(BaseHTTPRequestHandler):
    """One HTTP request: the OpenAPI document and Swagger UI, or the API through
    the detect handler (405 with ``Allow`` for a method no route takes)."""

    server_version = "content-retry-local"
    # Seconds a client may take to send its request: one that stalls mid-body
    # gets its connection closed instead of holding a thread forever.
    timeout = REQUEST_TIMEOUT_SECONDS
    dev_identity = False

    def _send(
        self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            if name.lower() not in ("content-type", "content-length"):
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _api(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", errors="replace") if length else None
        headers = dict(self.headers.items())
        caller = self.headers.get(DEV_USER_HEADER) if self.dev_identity else None
        event = api_gateway_event(self.command, self.path, headers, body, caller or None)
        # Powertools' resolver keeps the current request on one shared object,
        # so handler calls take turns; reading and writing requests does not.
        with _HANDLER_TURN:
            response = invoke("detect", event)
        self._send(
            int(response["statusCode"]),
            (response.get("body") or "").encode(),
            response.get("headers", {}).get("Content-Type", "application/json"),
            response.get("headers"),
        )

    def do_GET(self) -> None:
        from content_retry.api import openapi_document

        path = urlsplit(self.path).path
        if path == "/openapi.json":
            self._send(HTTPStatus.OK, openapi_document().encode(), "application/json")
        elif path in ("/", "/docs"):
            page = SWAGGER_PAGE.encode()
            policy = {"Content-Security-Policy": DOCS_CSP}
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", policy)
        elif path in DOCS_FILES:
            self._send(HTTPStatus.OK, docs_file(path), DOCS_FILES[path][1])
        else:
            self._api()

    def do_POST(self) -> None:
        self._api()

    def _not_allowed(self) -> None:
        path = urlsplit(self.path).path
        allowed = [method for method, pattern, _ in ROUTES if pattern.match(path)]
        if path in DOCS_PATHS:
            allowed = ["GET"]
        message = {"success": False, "message": f"method {self.command} not allowed", "errors": []}
        body = b"" if self.command == "HEAD" else json.dumps(message).encode()
        allow = {"Allow": ", ".join(allowed)} if allowed else None
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, body, "application/json", allow)

    def __getattr__(self, name: str) -> Any:
        # Any other method (PUT, TRACE, QUERY...): http.server looks up
        # do_<METHOD> and would answer 501; the API answers 405 instead.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        print(json.dumps({"event": "http_request", "line": format % args}))


def make_server(port: int, *, dev_identity: bool) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 answering with the detect handler, a thread per request."""
    handler = type("ApiRequestHandler", (ApiRequestHandler,), {"dev_identity": dev_identity})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server
