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
- the values of the secret environment variables a stage is handed (ENV_SECRETS: the source token, the
  Slack token, the S3 secret key), wherever they appear, should a server echo one back;
- the values of credential-like query parameters: presigned S3 URLs, `?token=`, `?access_token=`, and API
  keys (`?key=`, Dataverse's own way to pass an API token, `?api_key=`, `?apikey=`).

`url_secrets` returns the same secrets as raw values, for maskers that work on values (Airflow's), and
`has_url_secret` says whether a URL carries one at all: the DAG refuses such a `source` param, so that a
credential never reaches the run's stored conf (dermaops.config says where it goes instead).
"""

from __future__ import annotations

import os
import re

MASK = "***"
# The secret variables the runner hands a stage (plugins/dermaops_runner/credentials.py registers them with
# Airflow's masker too).
SOURCE_TOKEN_ENV = "DERMAOPS_SOURCE_TOKEN"  # the data source's API token or password (dermaops.sources)
ENV_SECRETS = (SOURCE_TOKEN_ENV, "SLACK_BOT_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words

# Query parameter names whose value is a credential. Matched whole (`?key=` but not `?monkey=`), in any case.
SECRET_QUERY_NAMES = (
    "access_token", "token", "key", "api_key", "apikey", "api-key", "password", "passwd", "secret",
    "client_secret", "signature", "sig", "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token",
    "AWSAccessKeyId",
)  # fmt: skip


def _any_case(name: str) -> str:
    # [kK][eE][yY] instead of a flag: the pattern below is also a JSON-schema pattern, which has no flags.
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in name if c.isalnum() or c in "_-")


# scheme://<userinfo>@ : the netloc ends at the first /, ?, # or whitespace; the LAST @ before that
# separates userinfo from host (the same rule as urllib.parse.urlsplit), so an unescaped @ inside
# a password does not leak its tail.
_SCHEME = r"\b[A-Za-z][A-Za-z0-9+.-]*://"
_NETLOC = "[^\\s/?#'\"<>`]*"
_QUERY_KEY = r"[?&;](?:" + "|".join(map(_any_case, SECRET_QUERY_NAMES)) + r")="
_QUERY_VALUE = "[^&;\\s#'\"<>`]+"
_USERINFO = re.compile(f"(?P<scheme>{_SCHEME})(?P<userinfo>{_NETLOC})@")
_SECRET_QUERY = re.compile(f"(?P<key>{_QUERY_KEY})(?P<value>{_QUERY_VALUE})")
_SLACK_TOKEN = re.compile(r"\bxox[abposre]-[A-Za-z0-9-]+")
# A URL credential (a userinfo or a credential query parameter) anywhere in a string, as one regular
# expression that means the same in Python and in JSON schema (ECMA-262): the DAG's `source` param refuses it.
URL_CREDENTIAL_PATTERN = f"{_SCHEME}{_NETLOC}@|{_QUERY_KEY}{_QUERY_VALUE}"


def redact(text: str) -> str:
    """`text` with every secret above replaced by `***`; text without secrets comes back unchanged."""
    if not isinstance(text, str) or not text:
        return text
    for name in ENV_SECRETS:
        value = os.environ.get(name)
        if value and len(value) >= MIN_SECRET_LENGTH and value in text:
            text = text.replace(value, MASK)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _SLACK_TOKEN.sub(MASK, text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def url_secrets(text: str) -> list[str]:
    """The raw secret strings `redact` would hide in URLs of `text` (the passwords, or lone user tokens, and
    the values of credential query parameters), for secret maskers that work on values, such as Airflow's
    `mask_secret`."""
    found = []
    for match in _USERINFO.finditer(text or ""):
        user, _, password = match["userinfo"].partition(":")
        secret = password or user
        if secret and secret != MASK:
            found.append(secret)
    found += [m["value"] for m in _SECRET_QUERY.finditer(text or "") if m["value"] != MASK]
    return found


def has_url_secret(text: str) -> bool:
    """Whether `text` holds a URL password, a user token or a credential query parameter."""
    return re.search(URL_CREDENTIAL_PATTERN, text or "") is not None
