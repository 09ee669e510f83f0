"""The service's write credential (mmfusion.serving.auth): where the token comes from, what each path needs,
the loopback rule without a token, and constant-time comparison (tests/service/test_auth.py serves it)."""

from __future__ import annotations

import pytest

from mmfusion.config import ParamsError, parse_params
from mmfusion.serving.auth import CLASSIFY_ENV, TOKEN_ENV, TOKEN_FILE_ENV, AuthConfigError, TokenGate, is_loopback, load_token

TOKEN = "k3y-" + "x" * 28


def scope(path: str, token: str | None = None, server=("127.0.0.1", 3000), scheme: str = "Bearer") -> dict:
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"Authorization", f"{scheme} {token}".encode()))
    return {"type": "http", "path": path, "headers": headers, "server": server}


def test_the_token_comes_from_the_environment_or_a_secret_file(tmp_path):
    assert load_token({}) is None
    assert load_token({TOKEN_ENV: TOKEN}) == TOKEN.encode()
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")  # as `kubectl create secret` or `echo` writes it
    assert load_token({TOKEN_FILE_ENV: str(secret)}) == TOKEN.encode()
    cases = {
        "not both": {TOKEN_ENV: TOKEN, TOKEN_FILE_ENV: str(secret)},
        "cannot read": {TOKEN_FILE_ENV: str(tmp_path / "missing")},
        "at least 16": {TOKEN_ENV: "short"},
    }
    for message, env in cases.items():
        with pytest.raises(AuthConfigError, match=message):
            load_token(env)
    (tmp_path / "empty").write_text("")
    with pytest.raises(AuthConfigError, match="empty"):
        load_token({TOKEN_FILE_ENV: str(tmp_path / "empty")})
    with pytest.raises(AuthConfigError, match="no token is set"):
        TokenGate(None, classify=True)
    # a deployment decides whether /classify needs the token, whatever the Bento was built with
    assert "/classify" in TokenGate.from_env(False, {TOKEN_ENV: TOKEN, CLASSIFY_ENV: "true"}).protected
    assert "/classify" not in TokenGate.from_env(True, {TOKEN_ENV: TOKEN, CLASSIFY_ENV: "false"}).protected
    with pytest.raises(AuthConfigError, match="true or false"):
        TokenGate.from_env(False, {CLASSIFY_ENV: "yes please"})


def test_protected_paths_need_the_token_and_nothing_else_does():
    gate = TokenGate(TOKEN.encode())
    assert gate.check(scope("/feedback", TOKEN)) is None
    assert gate.check(scope("/feedback/", TOKEN)) is None
    assert gate.check(scope("/feedback"))[:2] == (401, "missing_token")
    assert gate.check(scope("/feedback", TOKEN[:-1] + "y"))[:2] == (403, "wrong_token")
    assert gate.check(scope("/feedback", TOKEN, scheme="Basic"))[:2] == (403, "wrong_token")
    assert gate.check(scope("/feedback", TOKEN + "x"))[:2] == (403, "wrong_token")
    for open_path in ("/classify", "/classify_batch", "/health", "/metadata", "/readyz", "/docs.json"):
        assert gate.check(scope(open_path)) is None
    assert gate.describe()["refused"] == {"missing_token": 1, "wrong_token": 3}
    assert gate.describe()["needs_token"] == ["/feedback"] and gate.describe()["loopback_only"] == []
    refusal = gate.check(scope("/feedback", "wrong-token-value-0123"))
    assert "wrong-token-value" not in repr(refusal) and TOKEN not in repr(refusal) and TOKEN not in repr(gate.describe())
    strict = TokenGate(TOKEN.encode(), classify=True)
    assert strict.check(scope("/classify"))[:2] == (401, "missing_token")
    assert strict.check(scope("/classify_batch", TOKEN)) is None
    assert strict.describe()["needs_token"] == ["/classify", "/classify_batch", "/feedback"]


def test_without_a_token_writes_come_over_loopback_only():
    gate = TokenGate(None)
    assert gate.check(scope("/feedback", server=("127.0.0.1", 3000))) is None
    assert gate.check(scope("/feedback", server=("::1", 3000))) is None
    assert gate.check(scope("/feedback", server=("10.1.2.3", 3000)))[:2] == (403, "token_required")
    assert gate.check(scope("/feedback", server=None))[:2] == (403, "token_required")
    assert gate.check(scope("/classify", server=("10.1.2.3", 3000))) is None  # reads stay open
    assert gate.describe() == {"token": False, "needs_token": [], "loopback_only": ["/feedback"], "refused": {"token_required": 2}}
    assert is_loopback(("127.0.0.2", 1)) and not is_loopback(("0.0.0.0", 1)) and not is_loopback(("example.org", 1))


def test_the_auth_param_is_checked():
    assert parse_params({"package": {"auth": {"classify": True}}}).package.auth.classify is True
    with pytest.raises(ParamsError):
        parse_params({"package": {"auth": {"token": TOKEN}}})  # the token is never a param
