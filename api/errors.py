"""The API's one error: raised anywhere (routes, sign-in checks), answered in the OpenAI error shape
with the HTTP status repeated."""

from __future__ import annotations

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               504: "timeout_error"}
# The OpenAI client retries 5xx answers by default; a retried generation would be a second one.
NO_RETRY = {"x-should-retry": "false"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 generation_id: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.generation_id, self.headers = generation_id, headers


def error_response(status: int, code: str, message: str, param: str | None = None,
                   generation_id: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    detail = {"status": status, "code": code, "message": message,
              "type": ERROR_TYPES.get(status, "server_error"), "param": param, "generation_id": generation_id}
    return JSONResponse({"error": detail}, status_code=status, headers=headers)
