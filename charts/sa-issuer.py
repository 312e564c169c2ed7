"""A test Kubernetes service-account issuer for charts/test.sh, with openssl.

    sa-issuer.py KEY.pem jwks                      the JWKS (/openid/v1/jwks)
    sa-issuer.py KEY.pem token NAMESPACE SA POD    a projected token (RS256)

KEY.pem is an RSA private key (openssl genpkey -algorithm RSA).
"""
import base64
import json
import subprocess
import sys
import time

ISSUER = "https://kubernetes.default.svc.cluster.local"
KID = "chart-test"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwks(key: str) -> str:
    out = subprocess.run(["openssl", "rsa", "-in", key, "-noout", "-modulus"],
                         capture_output=True, check=True, text=True).stdout
    n = bytes.fromhex(out.strip().split("=", 1)[1])
    return json.dumps({"keys": [{"use": "sig", "kty": "RSA", "kid": KID, "alg": "RS256",
                                 "n": b64(n), "e": "AQAB"}]})


def token(key: str, namespace: str, sa: str, pod: str) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER, "aud": ["custody"], "exp": now + 3600, "iat": now, "nbf": now,
        "sub": f"system:serviceaccount:{namespace}:{sa}",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": sa, "uid": "5b2f1c0e-0000-4000-8000-000000000001"},
            "pod": {"name": pod, "uid": "5b2f1c0e-0000-4000-8000-000000000002"},
        },
    }
    header = {"alg": "RS256", "kid": KID, "typ": "JWT"}
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key],
                               input=signing_input.encode(), capture_output=True,
                               check=True).stdout
    return signing_input + "." + b64(signature)


if __name__ == "__main__":
    if sys.argv[2] == "jwks":
        print(jwks(sys.argv[1]))
    else:
        print(token(sys.argv[1], *sys.argv[3:6]), end="")
