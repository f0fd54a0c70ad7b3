"""Keep secrets out of text that leaves the process: log lines, exception text, replies.

The exchangerate.host access key travels in the query string, so it turns up wherever a URL
does: urllib3's DEBUG log of every request, requests' exception messages, and error text of
APIs that echo the request back. ``redact`` masks it there; ``RedactingFormatter`` applies
it to every formatted log record, including those of library loggers.
"""

import logging
import re
import urllib.parse

MASK = "***"

# Any access key in a query string, even one we were never told about (a key from a
# previous configuration, or one an API echoes back in another spelling). The value ends
# where a URL component or the surrounding text ends.
_ACCESS_KEY_PARAM = re.compile(r"(access_key(?:=|%3D))[^&\s\"'<>#;,)]*", re.IGNORECASE)


def redact(text, secrets=()):
    """``text`` as a string with each non-empty secret, and any ``access_key=`` value, masked.

    A secret is also masked in its percent-encoded spellings, which is how it appears in a
    URL when it holds characters outside ``[A-Za-z0-9_.-~]``.
    """
    text = str(text)
    for variant in _spellings(secrets):
        text = text.replace(variant, MASK)
    return _ACCESS_KEY_PARAM.sub(lambda match: match.group(1) + MASK, text)


def _spellings(secrets):
    variants = set()
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

    def __init__(self, *args, secrets=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.secrets = tuple(str(secret) for secret in secrets or () if secret)

    def format(self, record):
        text = redact(super().format(record), self.secrets)
        # logging caches the traceback text on the record for every handler that formats it
        # after us; leave the cached copy clean too.
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return text
