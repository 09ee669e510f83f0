"""Who may write: a bearer token for the endpoints that change what the system learns.

`/feedback` stores labels that become training data (and can start a retrain that gets promoted), so
it needs a credential once anyone but the machine's own users can reach the service:

- The token comes from the environment when the service starts: `MMFUSION_API_TOKEN`, or the file
  named by `MMFUSION_API_TOKEN_FILE` (how Kubernetes mounts a Secret; one trailing newline is
  ignored). Never from params.yaml, so it is in no Bento, report or artifact. At least 16 characters.
- A request to a protected path needs `Authorization: Bearer <token>`, compared in constant time
  (`hmac.compare_digest`): none gives 401 `missing_token` (with `WWW-Authenticate: Bearer`), another
  403 `wrong_token`. It is answered before its body is read, never reaches the model or the inference
  log, and the token is never written anywhere; refusals are counted in `/health`.
- With no token configured, `/feedback` answers only requests that reach the service over the
  loopback interface (always so when it binds 127.0.0.1, the default); bound to another address,
  the rest get 403 `token_required`.
- `package.auth.classify: true` (or `MMFUSION_AUTH_CLASSIFY=true` where the Bento is served: a Bento's
  params are fixed when it is built) protects `/classify` and `/classify_batch` too; it needs a token.
  `/health`, `/metadata`, `/readyz`, `/livez` and the docs never need one.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmfusion.errors import UserError

TOKEN_ENV = "MMFUSION_API_TOKEN"
TOKEN_FILE_ENV = "MMFUSION_API_TOKEN_FILE"
CLASSIFY_ENV = "MMFUSION_AUTH_CLASSIFY"  # true | false: overrides package.auth.classify where the Bento is served
MIN_TOKEN_CHARS = 16
WRITE_PATHS = frozenset({"/feedback"})
CLASSIFY_PATHS = frozenset({"/classify", "/classify_batch"})


class AuthConfigError(UserError):
    """The service's credential settings cannot work; it does not start."""


def load_token(environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The service's token from `MMFUSION_API_TOKEN` or the file `MMFUSION_API_TOKEN_FILE` names (None: not set)."""
    value, path = environ.get(TOKEN_ENV, ""), environ.get(TOKEN_FILE_ENV, "")
    if value and path:
        raise AuthConfigError(f"set {TOKEN_ENV} or {TOKEN_FILE_ENV}, not both")
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"{TOKEN_FILE_ENV}={path}: cannot read the token file ({exc})") from exc
        if not value:
            raise AuthConfigError(f"{TOKEN_FILE_ENV}={path}: the token file is empty")
    if not value:
        return None
    if len(value) < MIN_TOKEN_CHARS or value != value.strip() or not value.isprintable():
        where = TOKEN_FILE_ENV if path else TOKEN_ENV
        raise AuthConfigError(f"{where}: the token must be at least {MIN_TOKEN_CHARS} printable characters, "
                              "without spaces at either end (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")  # fmt: skip
    return value.encode("utf-8")


def is_loopback(address: Any) -> bool:
    """True when an ASGI `server`/`client` address (host, port) is a loopback one; a Unix socket counts too."""
    if not address:
        return False
    host = str(address[0]) if isinstance(address, (tuple, list)) else str(address)
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost" or host.startswith("/")


class TokenGate:
    """Decides, from the request line and headers alone, whether a request may go on (see the module docstring)."""

    def __init__(self, token: bytes | None, classify: bool = False):
        if classify and token is None:
            raise AuthConfigError(f"package.auth.classify is true but no token is set: set {TOKEN_ENV} or {TOKEN_FILE_ENV}")
        self.token = token
        self.protected = WRITE_PATHS | (CLASSIFY_PATHS if classify else frozenset())
        self.refused: Counter[str] = Counter()

    @classmethod
    def from_env(cls, classify: bool = False, environ: Mapping[str, str] = os.environ) -> TokenGate:
        """The gate of a starting service: its token from the environment; `classify` (package.auth.classify,
        baked into the Bento) unless MMFUSION_AUTH_CLASSIFY says otherwise for this deployment."""
        override = environ.get(CLASSIFY_ENV, "").strip().lower()
        if override:
            if override not in ("true", "false"):
                raise AuthConfigError(f"{CLASSIFY_ENV} must be true or false, got {override!r}")
            classify = override == "true"
        return cls(load_token(environ), classify)

    def check(self, scope: Mapping[str, Any]) -> tuple[int, str, str] | None:
        """None when the request may go on, else (status, reason, message) to answer with."""
        path = str(scope.get("path", "")).rstrip("/") or "/"
        if path not in self.protected:
            return None
        if self.token is None:  # only /feedback is protected then
            if is_loopback(scope.get("server")):
                return None
            return self._refuse(403, "token_required",
                                f"{path} takes writes from this machine only unless the service has a token: set {TOKEN_ENV} "
                                f"(or {TOKEN_FILE_ENV}) where it runs and send Authorization: Bearer <token>")  # fmt: skip
        given = _header(scope, b"authorization")
        if given is None:
            return self._refuse(401, "missing_token", f"{path} needs an Authorization: Bearer <token> header")
        scheme, _, credential = given.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credential.strip(), self.token):
            return self._refuse(403, "wrong_token", f"the bearer token sent to {path} is not this service's")
        return None

    def _refuse(self, status: int, reason: str, message: str) -> tuple[int, str, str]:
        self.refused[reason] += 1
        return status, reason, message

    def describe(self) -> dict[str, Any]:
        """What /health shows: whether a token is set, which paths need it, and this worker's refusals."""
        return {"token": self.token is not None, "needs_token": sorted(self.protected) if self.token else [],
                "loopback_only": [] if self.token else sorted(WRITE_PATHS), "refused": dict(self.refused)}  # fmt: skip


def _header(scope: Mapping[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value
    return None
