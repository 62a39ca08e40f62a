"""The worklist's sign-in against a real OpenID Connect provider (panva's oidc-provider, tests/support/oidc.py).

First the provider itself, as the worklist's OIDC client will meet it: discovery, the authorization code flow with
PKCE (RFC 7636; required by the provider, as the OAuth 2.0 Security BCP, RFC 9700 §2.1.1, asks), signed ID tokens
carrying the configured ``roles`` claim, refusals of wrong passwords, of a request without PKCE and of a replayed
code. Then the served worklist (``g2250-cds serve`` with ``worklist.login: oidc``) signing people in through it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session

from tests.support.oidc import ACCOUNTS, LoginRefused, OidcProvider, follow_login, start_provider

REDIRECT_URI = "http://127.0.0.1:9/callback"  # never fetched: follow_login stops there (port 9: discard)


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    op = start_provider(tmp_path_factory.mktemp("oidc"), redirect_uris=[REDIRECT_URI])
    yield op
    op.stop()


def _client(provider: OidcProvider, scope: str = "openid profile email") -> OAuth2Session:
    return OAuth2Session(provider.client_id, provider.client_secret, scope=scope, redirect_uri=REDIRECT_URI,
                         code_challenge_method="S256")


def _authorize(provider: OidcProvider, username: str, password: str, *, scope: str = "openid profile email"
               ) -> tuple[OAuth2Session, str, str, str]:
    """The front channel: an authorization URL with PKCE, a login; returns the client, the callback URL, the
    verifier and the nonce."""
    discovery = provider.discovery()
    client = _client(provider, scope)
    verifier = secrets.token_urlsafe(48)
    nonce = secrets.token_urlsafe(16)
    url, state = client.create_authorization_url(discovery["authorization_endpoint"], code_verifier=verifier,
                                                 nonce=nonce)
    with requests.Session() as browser:
        result = follow_login(browser, url, username, password, stop_at=REDIRECT_URI)
    query = parse_qs(urlsplit(result.url).query)
    assert query["state"] == [state]
    assert query["iss"] == [provider.issuer]  # RFC 9207: the issuer is named in the response
    return client, result.url, verifier, nonce


def test_discovery_document_names_what_the_worklist_uses(provider: OidcProvider) -> None:
    document = provider.discovery()
    assert document["issuer"] == provider.issuer
    for endpoint in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint",
                     "end_session_endpoint"):
        assert document[endpoint].startswith(provider.issuer + "/")
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert "roles" in document["claims_supported"]
    assert "RS256" in document["id_token_signing_alg_values_supported"]


@pytest.mark.parametrize("username", sorted(ACCOUNTS))
def test_code_flow_with_pkce_gives_a_signed_id_token_with_the_roles(provider: OidcProvider, username: str) -> None:
    account = ACCOUNTS[username]
    client, callback, verifier, nonce = _authorize(provider, username, account["password"])
    discovery = provider.discovery()
    token = client.fetch_token(discovery["token_endpoint"], authorization_response=callback, code_verifier=verifier)
    signing_key = jwt.PyJWKClient(discovery["jwks_uri"]).get_signing_key_from_jwt(token["id_token"])
    claims = jwt.decode(token["id_token"], signing_key.key, algorithms=["RS256"], audience=provider.client_id,
                        issuer=provider.issuer)
    assert claims["sub"] == username
    assert claims["nonce"] == nonce
    assert claims["roles"] == account["roles"]
    assert claims["name"] == account["name"]
    userinfo = client.get(discovery["userinfo_endpoint"]).json()
    assert userinfo["roles"] == account["roles"]
    assert userinfo["preferred_username"] == username


def test_roles_arrive_with_the_openid_scope_alone(provider: OidcProvider) -> None:
    client, callback, verifier, _ = _authorize(provider, "coder1", ACCOUNTS["coder1"]["password"], scope="openid")
    token = client.fetch_token(provider.discovery()["token_endpoint"], authorization_response=callback,
                               code_verifier=verifier)
    assert jwt.decode(token["id_token"], options={"verify_signature": False})["roles"] == ["coder"]


def test_a_wrong_password_or_an_unknown_user_is_refused(provider: OidcProvider) -> None:
    url, _ = _client(provider).create_authorization_url(provider.discovery()["authorization_endpoint"],
                                                        code_verifier=secrets.token_urlsafe(48))
    with requests.Session() as browser, pytest.raises(LoginRefused, match="wrong password"):
        follow_login(browser, url, "coder1", "not-the-password", stop_at=REDIRECT_URI)
    with requests.Session() as browser, pytest.raises(LoginRefused):
        follow_login(browser, url, "mallory", "coder1-pass", stop_at=REDIRECT_URI)


def test_an_authorization_request_without_pkce_is_refused(provider: OidcProvider) -> None:
    client = OAuth2Session(provider.client_id, provider.client_secret, scope="openid", redirect_uri=REDIRECT_URI)
    url, _ = client.create_authorization_url(provider.discovery()["authorization_endpoint"])
    with requests.Session() as browser:
        result = follow_login(browser, url, "coder1", ACCOUNTS["coder1"]["password"], stop_at=REDIRECT_URI)
    query = parse_qs(urlsplit(result.url).query)
    assert query["error"] == ["invalid_request"]
    assert "code" not in query


def test_a_code_is_good_once(provider: OidcProvider) -> None:
    client, callback, verifier, _ = _authorize(provider, "viewer1", ACCOUNTS["viewer1"]["password"])
    token_endpoint = provider.discovery()["token_endpoint"]
    client.fetch_token(token_endpoint, authorization_response=callback, code_verifier=verifier)
    code = parse_qs(urlsplit(callback).query)["code"][0]
    replay = requests.post(token_endpoint, data={"grant_type": "authorization_code", "code": code,
                                                 "redirect_uri": REDIRECT_URI, "code_verifier": verifier},
                           auth=(provider.client_id, provider.client_secret), timeout=5)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"


def test_a_wrong_verifier_is_refused(provider: OidcProvider) -> None:
    _, callback, _, _ = _authorize(provider, "coder1", ACCOUNTS["coder1"]["password"])
    code = parse_qs(urlsplit(callback).query)["code"][0]
    answer = requests.post(provider.discovery()["token_endpoint"],
                           data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
                                 "code_verifier": secrets.token_urlsafe(48)},
                           auth=(provider.client_id, provider.client_secret), timeout=5)
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_grant"


def test_the_provider_keeps_its_pages_on_loopback(provider: OidcProvider) -> None:
    """The login page and the error page load nothing from elsewhere (oidc-provider's defaults import a web font):
    the browser tests allow loopback traffic only."""
    url, _ = _client(provider).create_authorization_url(provider.discovery()["authorization_endpoint"],
                                                        code_verifier=secrets.token_urlsafe(48))
    with requests.Session() as browser:
        page = browser.get(url, timeout=5)  # redirected to the login page
        error = browser.get(f"{provider.issuer}/auth?client_id=unknown&response_type=code&scope=openid", timeout=5)
    assert 'id="login-form"' in page.text
    assert error.status_code == 400
    for html in (page.text, error.text):
        assert "https://" not in html and "//fonts" not in html
