"""The shared-secret signature, exactly as DESIGN.md writes it."""

import hashlib
import hmac

import pytest

from agent_proxy import signing

SECRET = b"0123456789abcdef0123456789abcdef"


def test_signature_is_the_documented_hmac():
    expected = hmac.new(SECRET, b"v1\n1700000000\nsite-a\nPOST\n/a?b=1\n10.0.0.2", hashlib.sha256).hexdigest()
    assert signing.signature(SECRET, 1700000000, "site-a", "POST", "/a?b=1", "10.0.0.2") == expected


def test_authorization_round_trip():
    header = signing.authorization(SECRET, "site-a", "GET", "/_proxy/v2/features", ts=1000)
    assert header.startswith("AgentProxy-HMAC ts=1000, sig=")
    signing.verify_authorization(header, SECRET, "site-a", "GET", "/_proxy/v2/features", 300, now=1100)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"path": "/_proxy/other"}, "does not match"),
        ({"method": "POST"}, "does not match"),
        ({"proxy_id": "site-b"}, "does not match"),
        ({"secret": b"another-secret-another-secret!!"}, "does not match"),
        ({"now": 1000 + 301}, "is 301 s old"),
        ({"now": 1000 - 301}, "is 301 s in the future"),
    ],
)
def test_authorization_refused(change, message):
    header = signing.authorization(SECRET, "site-a", "GET", "/_proxy/v2/features", ts=1000)
    args = {"secret": SECRET, "proxy_id": "site-a", "method": "GET", "path": "/_proxy/v2/features", "now": 1000}
    args.update(change)
    with pytest.raises(signing.SignatureError, match=message):
        signing.verify_authorization(header, args["secret"], args["proxy_id"], args["method"], args["path"], 300, now=args["now"])


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "missing signature"),
        ("", "missing signature"),
        ("Bearer abc", "must start with 'AgentProxy-HMAC'"),
        ("AgentProxy-HMAC ts=abc, sig=00", "malformed"),
        ("AgentProxy-HMAC ts=1, sig=" + "g" * 64, "malformed"),
    ],
)
def test_malformed_authorization(value, message):
    with pytest.raises(signing.SignatureError, match=message):
        signing.verify_authorization(value, SECRET, "site-a", "GET", "/", 300, now=1)


def test_proxy_signature_header_includes_the_client_ip():
    header = signing.signature_header(SECRET, "site-a", "POST", "/agent/v1/checkin", "10.0.0.2", ts=50)
    signing.verify_signature_header(header, SECRET, "site-a", "POST", "/agent/v1/checkin", "10.0.0.2", now=50)
    with pytest.raises(signing.SignatureError):
        signing.verify_signature_header(header, SECRET, "site-a", "POST", "/agent/v1/checkin", "10.0.0.3", now=50)
