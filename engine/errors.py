"""The one error taxonomy.

Every row that does not end ``ok`` ends with exactly one :class:`Reason`. The same short
string is stored in the state DB (``images.reason``), used as the ``reason`` label of the
Prometheus metrics (so the label has a fixed, small set of values) and shown by the UIs.
Add a member here, never a free-text reason anywhere else.
"""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    # -- input ------------------------------------------------------------------------
    MALFORMED_ROW = "malformed_row"  # the list row could not be parsed
    BAD_ID = "bad_id"  # ImageID unsafe or invalid as a file name
    BAD_URL = "bad_url"  # missing URL or a scheme other than http/https
    # -- HTTP status --------------------------------------------------------------------
    HTTP_400 = "http_400"
    HTTP_401 = "http_401"
    HTTP_403 = "http_403"
    HTTP_404 = "http_404"
    HTTP_410 = "http_410"
    HTTP_429 = "http_429"  # still rate limited after every retry
    HTTP_4XX = "http_4xx"  # any other 4xx
    HTTP_5XX = "http_5xx"  # still failing after every retry
    HTTP_OTHER = "http_other"  # 1xx/3xx without Location, or nonsense status
    # -- transport ----------------------------------------------------------------------
    DNS = "dns"  # host name did not resolve
    CONNECT = "connect"  # refused / unreachable / connect timeout
    TLS = "tls"  # handshake or certificate failure
    TIMEOUT = "timeout"  # total deadline for the image exceeded
    STALLED = "stalled"  # below the low-speed limit for too long
    RESET = "reset"  # connection reset / receive error mid-transfer
    TRUNCATED = "truncated"  # body or image data ends early
    TOO_LARGE = "too_large"  # body over the byte cap
    REDIRECT_LOOP = "redirect_loop"  # more redirects than --max-redirects
    BAD_REDIRECT = "bad_redirect"  # redirect to a non-http(s) scheme
    NETWORK = "network"  # any other transport error
    # -- fidelity -----------------------------------------------------------------------
    UNAVAILABLE = "unavailable"  # Flickr "photo unavailable" placeholder
    SIZE_MISMATCH = "size_mismatch"  # body length != OriginalSize
    MD5_MISMATCH = "md5_mismatch"  # body MD5 != OriginalMD5
    # -- image --------------------------------------------------------------------------
    EMPTY = "empty"  # zero-byte body
    NOT_AN_IMAGE = "not_an_image"  # HTML, XML, text, unknown format
    CORRUPT = "corrupt"  # decodes with errors that are not truncation
    TOO_MANY_PIXELS = "too_many_pixels"  # over the pixel cap (decompression bomb)
    UNSUPPORTED = "unsupported"  # an image format we do not decode
    PNG_DISCARDED = "png_discarded"  # --png discard
    # -- engine -------------------------------------------------------------------------
    WORKER_CRASH = "worker_crash"  # the image killed its worker more than once
    INTERNAL = "internal"  # a bug: an unexpected exception, logged with a traceback
    TASK_FAILED = "task_failed"  # --ray: the row's shard failed on every retry (node lost, engine error)

    def __str__(self) -> str:  # so f-strings and CSVs show the short form
        return self.value


ALL_REASONS: tuple[str, ...] = tuple(r.value for r in Reason)

#: Failures worth another attempt: the next try may well succeed.
RETRYABLE: frozenset[Reason] = frozenset(
    {
        Reason.HTTP_429,
        Reason.HTTP_5XX,
        Reason.DNS,
        Reason.CONNECT,
        Reason.TIMEOUT,
        Reason.STALLED,
        Reason.RESET,
        Reason.TRUNCATED,
        Reason.NETWORK,
    }
)

_HTTP: dict[int, Reason] = {
    400: Reason.HTTP_400,
    401: Reason.HTTP_401,
    403: Reason.HTTP_403,
    404: Reason.HTTP_404,
    410: Reason.HTTP_410,
    429: Reason.HTTP_429,
}


def reason_for_status(status: int) -> Reason | None:
    """The reason for a final HTTP status, or None for a 2xx success."""
    if 200 <= status < 300:
        return None
    if status in _HTTP:
        return _HTTP[status]
    if 400 <= status < 500:
        return Reason.HTTP_4XX
    if 500 <= status < 600:
        return Reason.HTTP_5XX
    return Reason.HTTP_OTHER


# libcurl error codes (CURLcode), named here so the mapping below reads as prose.
_CURLE_UNSUPPORTED_PROTOCOL = 1
_CURLE_URL_MALFORMAT = 3
_CURLE_COULDNT_RESOLVE_PROXY = 5
_CURLE_COULDNT_RESOLVE_HOST = 6
_CURLE_COULDNT_CONNECT = 7
_CURLE_PARTIAL_FILE = 18
_CURLE_WRITE_ERROR = 23
_CURLE_OPERATION_TIMEDOUT = 28
_CURLE_SSL_CONNECT_ERROR = 35
_CURLE_TOO_MANY_REDIRECTS = 47
_CURLE_GOT_NOTHING = 52
_CURLE_SEND_ERROR = 55
_CURLE_RECV_ERROR = 56
_CURLE_SSL_CERTPROBLEM = 58
_CURLE_SSL_CIPHER = 59
_CURLE_PEER_FAILED_VERIFICATION = 60
_CURLE_BAD_CONTENT_ENCODING = 61
_CURLE_FILESIZE_EXCEEDED = 63
_CURLE_HTTP2 = 16
_CURLE_HTTP2_STREAM = 92

_CURL: dict[int, Reason] = {
    _CURLE_UNSUPPORTED_PROTOCOL: Reason.BAD_REDIRECT,  # only reachable via a redirect
    _CURLE_URL_MALFORMAT: Reason.BAD_URL,
    _CURLE_COULDNT_RESOLVE_PROXY: Reason.DNS,
    _CURLE_COULDNT_RESOLVE_HOST: Reason.DNS,
    _CURLE_COULDNT_CONNECT: Reason.CONNECT,
    _CURLE_PARTIAL_FILE: Reason.TRUNCATED,
    _CURLE_GOT_NOTHING: Reason.RESET,
    _CURLE_SEND_ERROR: Reason.RESET,
    _CURLE_RECV_ERROR: Reason.RESET,
    _CURLE_HTTP2: Reason.RESET,
    _CURLE_HTTP2_STREAM: Reason.RESET,
    _CURLE_SSL_CONNECT_ERROR: Reason.TLS,
    _CURLE_SSL_CERTPROBLEM: Reason.TLS,
    _CURLE_SSL_CIPHER: Reason.TLS,
    _CURLE_PEER_FAILED_VERIFICATION: Reason.TLS,
    _CURLE_BAD_CONTENT_ENCODING: Reason.CORRUPT,
    _CURLE_TOO_MANY_REDIRECTS: Reason.REDIRECT_LOOP,
    _CURLE_FILESIZE_EXCEEDED: Reason.TOO_LARGE,
}


def reason_for_curl(errno: int, message: str = "") -> Reason:
    """Map a libcurl error code (and its message, for the ambiguous ones) to a reason."""
    if errno == _CURLE_OPERATION_TIMEDOUT:
        # libcurl uses one code for connect timeout, low-speed abort and total deadline.
        low = message.lower()
        if "too slow" in low:
            return Reason.STALLED
        if "connect" in low or "resolv" in low:
            return Reason.CONNECT
        return Reason.TIMEOUT
    return _CURL.get(errno, Reason.NETWORK)


class RowFailed(Exception):
    """Raised anywhere in the pipeline to finish a row as failed with ``reason``."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
