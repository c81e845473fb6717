"""Uploads stop at the limit: the Content-Length is checked before the body is
read, and file bytes are counted as they arrive, so a 400 MB upload to a
1 MB limit writes at most 1 MB anywhere.

`LimitedUploadHandler` goes first in the handler list (settings:
FILE_UPLOAD_HANDLERS, or per view with `limit_upload`); `DataDirUploadHandler`
writes the file straight into the data dir, where an import keeps it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import HttpRequest, HttpResponse, QueryDict
from django.template.defaultfilters import filesizeformat
from django.utils.datastructures import MultiValueDict
from django.views.decorators.csrf import csrf_exempt, csrf_protect

# Room for the form's other fields and the multipart headers around the file.
FORM_OVERHEAD_BYTES = 64 * 1024


def refused(request: HttpRequest) -> str | None:
    """Why the upload handler refused this request's body, or None."""
    return getattr(request, "upload_refused", None)


class LimitedUploadHandler(FileUploadHandler):
    """Refuses a body whose Content-Length is over the limit without reading
    it, and stops a file at the byte past the limit (the handlers after this
    one never see that chunk). The reason is left on the request for the
    view (see `refused`)."""

    def __init__(self, request: HttpRequest | None = None, max_bytes: int | None = None) -> None:
        super().__init__(request)
        self.max_bytes = settings.UPLOAD_MAX_BYTES if max_bytes is None else max_bytes
        self.received = 0

    def _refuse(self, message: str) -> None:
        if self.request is not None:
            self.request.upload_refused = message  # type: ignore[attr-defined]  # read back by refused()

    # Django passes the boundary as bytes; django-stubs says str.
    def handle_raw_input(
        self,
        input_data: Any,
        META: dict[str, Any],
        content_length: int,
        boundary: bytes | str,
        encoding: str | None = None,
    ) -> tuple[QueryDict, MultiValueDict[str, Any]] | None:
        if content_length > self.max_bytes + FORM_OVERHEAD_BYTES:
            self._refuse(
                f"The upload is {filesizeformat(content_length)}; the limit is "
                f"{filesizeformat(self.max_bytes)}. Nothing was read or stored."
            )
            return QueryDict(), MultiValueDict()  # parsed as empty: the body is never read
        return None

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        self.received += len(raw_data)
        if self.received > self.max_bytes:
            name = f"{self.file_name} " if self.file_name else "The file "
            self._refuse(
                f"{name}is larger than the {filesizeformat(self.max_bytes)} limit; the upload was "
                "stopped there and nothing was stored."
            )
            raise StopUpload(connection_reset=True)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler stores the file


class DataDirFile(UploadedFile):
    """An upload written to a hidden temporary file in a directory of the
    data dir; deleted on close unless it was moved (`keep`)."""

    file: IO[bytes]  # never None: opened in __init__

    def __init__(
        self,
        directory: Path,
        name: str,
        content_type: str,
        size: int,
        charset: str | None,
        content_type_extra: dict[str, bytes] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        file = tempfile.NamedTemporaryFile(dir=directory, prefix=".upload-", delete=False)
        super().__init__(file, name, content_type, size, charset, content_type_extra)

    def temporary_file_path(self) -> str:
        return self.file.name

    def keep(self) -> Path:
        """Keep the file after the request (the caller now owns it)."""
        self.file.close()
        self.kept = True
        return Path(self.file.name)

    def close(self) -> None:
        self.file.close()
        if not getattr(self, "kept", False):
            Path(self.file.name).unlink(missing_ok=True)


class DataDirUploadHandler(FileUploadHandler):
    """Writes every uploaded file to the data dir (never to memory), so an
    import job can read it after the request."""

    def __init__(self, request: HttpRequest | None = None, directory: Path | None = None) -> None:
        super().__init__(request)
        self.directory = directory or Path(settings.MEDIA_ROOT) / "datasets"

    def new_file(
        self,
        field_name: str,
        file_name: str,
        content_type: str,
        content_length: int | None,
        charset: str | None = None,
        content_type_extra: dict[str, bytes] | None = None,
    ) -> None:
        super().new_file(field_name, file_name, content_type, content_length, charset, content_type_extra)
        self.file = DataDirFile(self.directory, file_name, content_type, 0, charset, content_type_extra)

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self.file.write(raw_data)

    def file_complete(self, file_size: int) -> UploadedFile:
        self.file.seek(0)
        self.file.size = file_size
        return self.file

    def upload_interrupted(self) -> None:
        if hasattr(self, "file"):
            self.file.close()


View = Callable[..., HttpResponse]


def limit_upload(
    on_refused: Callable[..., HttpResponse],
    max_bytes: Callable[[], int] | None = None,
    directory: Callable[[], Path] | None = None,
) -> Callable[[View], View]:
    """Parse the view's body with the limit in place, before anything reads
    it (the CSRF check included: so the view is csrf_exempt outside and
    csrf_protect inside, as Django's upload-handler docs describe). A refused
    body gets `on_refused(request, message, *args, **kwargs)`, which changes nothing."""

    def decorator(view: View) -> View:
        protected = csrf_protect(view)

        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            request.upload_handlers = [
                LimitedUploadHandler(request, max_bytes() if max_bytes else None),
                DataDirUploadHandler(request, directory() if directory else None),
            ]
            if request.method == "POST":
                request.POST  # noqa: B018  (parse now, under the limit)
            problem = refused(request)
            if problem:
                return on_refused(request, problem, *args, **kwargs)
            return protected(request, *args, **kwargs)

        return wrapper

    return decorator
