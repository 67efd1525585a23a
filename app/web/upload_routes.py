"""POST /api/generate/upload and POST /api/jobs/upload: the JSON routes' request with the images as
multipart files instead of base64 (33 % smaller, and what curl -F and browsers' forms send).

Parts: `params` (the JSON body of POST /api/generate, without the images) and the files
`init_image` and optionally `mask_image`. The files are handed to the same request model as base64
strings, so one validation covers both (not an image, truncated, a bomb, a mask of another size:
422 with the reason). These paths get `max_upload_mb` instead of `max_body_bytes`, counted as the
body arrives (app/web/bodylimit.py); a malformed or truncated form is a 400 with a reason."""

from __future__ import annotations

import base64
import json
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from app.web.job_routes import accepted

UPLOAD_ROUTES = ("/api/generate/upload", "/api/jobs/upload")
IMAGE_PARTS = ("init_image", "mask_image")


_BOUNDARY = re.compile(r'boundary=("?)([^";]+)\1')


async def _check_complete(request: Request) -> None:
    """A form cut off on the way parses without complaint and just lacks its last part: a
    truncated init_image would silently become text-to-image. The whole body (already bounded
    by the upload limit) must end with the closing boundary."""
    content_type = request.headers.get("content-type", "")
    match = _BOUNDARY.search(content_type)
    if not content_type.startswith("multipart/form-data") or match is None:
        raise StarletteHTTPException(400, "send multipart/form-data (params + init_image, mask_image files)")
    body = await request.body()  # kept by the request: the form parser below reads it again
    if not body.rstrip(b"\r\n").endswith(b"--" + match.group(2).encode() + b"--"):
        raise StarletteHTTPException(400, "truncated multipart body: it has no closing boundary")


async def request_from_form(request: Request, service):
    """The typed generate request from a multipart form, or a 400/422 saying what is wrong."""
    await _check_complete(request)
    try:
        form = await request.form(max_files=len(IMAGE_PARTS), max_fields=1)
    except MultiPartException as exc:
        raise StarletteHTTPException(400, f"malformed multipart body: {exc.message}") from exc
    except (ValueError, UnicodeDecodeError) as exc:  # a body that is not the form it claims to be
        raise StarletteHTTPException(400, f"malformed multipart body: {exc}") from exc
    try:
        params = form.get("params")
        if params is None or isinstance(params, UploadFile):
            raise StarletteHTTPException(422, "the form needs a `params` field: the JSON generate body")
        try:
            data = json.loads(params)
        except ValueError as exc:
            raise StarletteHTTPException(422, f"`params` is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise StarletteHTTPException(422, "`params` must be a JSON object (the generate body)")
        for name in IMAGE_PARTS:
            part = form.get(name)
            if isinstance(part, UploadFile):
                data[name] = base64.b64encode(await part.read()).decode()
            elif part is not None:
                raise StarletteHTTPException(422, f"`{name}` must be a file part")
        try:
            return service.validate(data)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
    finally:
        await form.close()


def add_upload_routes(app: FastAPI, service, book) -> None:
    @app.post("/api/generate/upload", tags=["api"])
    async def generate_upload(request: Request):
        """POST /api/generate with the images as multipart files (`params` + `init_image`, `mask_image`)."""
        req = await request_from_form(request, service)
        response = await service.generate(req, request.state.request_id, receive=request.receive)
        return JSONResponse(response.model_dump(mode="json", exclude_none=True))

    @app.post("/api/jobs/upload", status_code=202, tags=["jobs"])
    async def create_job_upload(request: Request):
        """POST /api/jobs with the images as multipart files."""
        return accepted(book, await book.start(await request_from_form(request, service)))
