"""Keep secrets out of text that leaves the process: log lines, exception text, replies.

The exchangerate.host access key travels in the query string, so it turns up wherever a URL
does: urllib3's DEBUG log of every request, requests' exception messages, and error text of
APIs that echo the request back. ``redact`` masks it there; ``RedactingFormatter`` applies
it to every formatted log record, including those of library loggers.
"""

import logging
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

MASK = "***"

# Any access key in a query string, even one we were never told about (a key from a
# previous configuration, or one an API echoes back in another spelling). The value ends
# where a URL component or the surrounding text ends.
_ACCESS_KEY_PARAM = re.compile(r"(access_key(?:=|%3D))[^&\s\"'<>#;,)]*", re.IGNORECASE)

#: A secret at least this long is masked wherever it appears; a shorter one could be part of
#: ordinary words (a key "e" is in "exrate_green"), so it is masked only where it stands
#: whole as a value: after "=" in a query string or a form, or quoted.
MIN_ANYWHERE_LEN = 8
_VALUE_START = r"(?:(?<==)|(?<=%3D)|(?<=%3d)|(?<=[\"']))"
_VALUE_END = r"(?=$|[&#;,)\s\"'<>])"


def redact(text: object, secrets: Iterable[str | None] | None = ()) -> str:
    """``text`` as a string with each non-empty secret, and any ``access_key=`` value, masked.

    A secret is also masked in its percent-encoded spellings, which is how it appears in a
    URL when it holds characters outside ``[A-Za-z0-9_.-~]``. Secrets shorter than
    ``MIN_ANYWHERE_LEN`` are masked only as whole values (see there).
    """
    text = str(text)
    for variant in _spellings(secrets):
        if len(variant) >= MIN_ANYWHERE_LEN:
            text = text.replace(variant, MASK)
        else:
            text = re.sub(_VALUE_START + re.escape(variant) + _VALUE_END, MASK, text)
    return _ACCESS_KEY_PARAM.sub(lambda match: match.group(1) + MASK, text)


def _spellings(secrets: Iterable[str | None] | None) -> list[str]:
    variants: set[str] = set()
    for secret in secrets or ():
        if secret:
            secret = str(secret)
            variants.update((secret, urllib.parse.quote(secret, safe=""),
                             urllib.parse.quote_plus(secret, safe="")))
    # Longest first, so a secret that contains another is masked whole.
    return sorted(variants, key=len, reverse=True)


class RedactingFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose output never holds one of ``secrets``.

    The whole formatted record is redacted (message, interpolated args, exception and stack
    text), so installing it on the process's handler covers library loggers too: urllib3
    logs every request line, query string included, at DEBUG.

    Takes the arguments of ``logging.Formatter`` plus the keyword ``secrets`` (strings;
    empty and ``None`` ones are ignored).
    """

    def __init__(self, *args: Any, secrets: Iterable[str | None] | None = (),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secrets = tuple(str(secret) for secret in secrets or () if secret)

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record), self.secrets)
        # logging caches the traceback text on the record for every handler that formats it
        # after us; leave the cached copy clean too.
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return text
