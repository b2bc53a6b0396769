"""Mint HS256 tokens the way the Python hypha server (python-jose) does, without a JWT library.

Used once to produce the `PY_*` token constants in `core/src/auth.rs` tests: the header is
`json.dumps(header, separators=(",", ":"), sort_keys=True)`, the payload
`json.dumps(claims, separators=(",", ":"))` (ensure_ascii on, insertion order), both
base64url without padding, signed with HMAC-SHA256 over `header.payload`.

Run: /work/main/.venv/bin/python core/tests/data/auth_mint_tokens.py
"""
import base64
import hashlib
import hmac
import json

SECRET = "hypha-rs-interop-secret-0123456789"
ISS = "https://amun.ai/"
AUD = "https://amun-ai.eu.auth0.com/api/v2/"
NS = "https://amun.ai/"
IAT = 1795240776
EXP = 4102444800  # 2100-01-01, far future


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(sub, scope, roles, email, parent=None, iat=IAT, exp=EXP):
    header = json.dumps({"typ": "JWT", "alg": "HS256"}, separators=(",", ":"), sort_keys=True)
    claims = {
        "iss": ISS,
        "sub": sub,
        "aud": AUD,
        "iat": iat,
        "exp": exp,
        "scope": scope,
        "gty": "client-credentials",
        NS + "roles": roles,
        NS + "email": email,
    }
    if parent is not None:
        claims[NS + "parent"] = parent
    signing_input = b64(header.encode()) + "." + b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


ANON = "anonymouz-harsh-canidae-74400639"
TOKENS = {
    # The reconnection token of the anonymous client `probe-ok` (server spec section 2.3).
    "PY_RECONNECT_ANON": mint(
        ANON, f"ws:ws-user-{ANON}#a cid:probe-ok wid:ws-user-{ANON}", ["anonymous"], None
    ),
    # A generic token of alice (no wid).
    "PY_ALICE": mint("alice", "ws:ws-user-alice#a", [], "alice@example.com"),
    # A generate_token() child of alice for her workspace alice-ws-1 (section 2.3).
    "PY_CHILD": mint(
        "melodic-offer-54480218", "ws:alice-ws-1#rw wid:alice-ws-1", [], "alice@example.com", "alice"
    ),
    # A specialized token (extra scope with ':') with a non-ASCII email (ensure_ascii escapes).
    "PY_SPECIAL": mint("zoe", "ws:W#rw wid:W my-data:read", ["admin"], "zo\u00eb@example.com"),
}

if __name__ == "__main__":
    for name, token in TOKENS.items():
        print(f'const {name}: &str =\n    "{token}";')
