"""The one place where secrets are scrubbed from text that leaves a process.

Every path that can carry a user-supplied URL out of a stage goes through `redact`: the stage's log
lines and its one-line error (cli.py), its JSON summary (the XCom), the runner's logged command line
and the XCom `error` it pushes (plugins/dermaops_runner), notify's report.md / report.json and the
Slack message. It is applied to whole lines rather than to known URL fields, because a URL ends up
inside free text (exception messages, retry warnings) long before anything knows it is there.

What it removes:
- the userinfo of any URL (`https://reader:secret@host/x` -> `https://***@host/x`; a lone token in the
  user part counts as a secret too);
- Slack tokens (`xoxb-...`), which are never meant to be printed anyway;
- the values of credential-like query parameters (presigned S3 URLs, `?token=`, `?access_token=`).
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://<userinfo>@ : the netloc ends at the first /, ?, # or whitespace; the LAST @ before that
# separates userinfo from host (the same rule as urllib.parse.urlsplit), so an unescaped @ inside
# a password does not leak its tail.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#'\"<>`]*)@")
_SLACK_TOKEN = re.compile(r"\bxox[abposre]-[A-Za-z0-9-]+")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:access_token|token|password|passwd|secret|signature|sig|X-Amz-Signature|X-Amz-Credential|"
    r"X-Amz-Security-Token|AWSAccessKeyId)=)[^&\s#'\"<>`]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with every secret above replaced by `***`; text without secrets comes back unchanged."""
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _SLACK_TOKEN.sub(MASK, text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def url_secrets(text: str) -> list[str]:
    """The raw secret strings `redact` would hide in URLs of `text` (the passwords, or lone user tokens),
    for secret maskers that work on values, such as Airflow's `mask_secret`."""
    found = []
    for match in _USERINFO.finditer(text or ""):
        user, _, password = match["userinfo"].partition(":")
        secret = password or user
        if secret and secret != MASK:
            found.append(secret)
    return found
