"""S3 POST policies: a form a job's side can upload objects with, limited to one key prefix.

A presigned POST carries a policy (what the upload may be: this bucket, keys that start with
the entry's prefix, at most so many bytes, until when) and its SigV4 signature; the store
checks both on each upload, so the holder can write under that prefix and nowhere else, and
never read or delete. It suits a job whose file names are not known in advance, as a
presigned PUT (one key per URL) does not. The signing follows AWS's "Signature Version 4 for
POST" (the signature is of the base64 policy), checked against botocore's in the tests.
obstore makes no POST policies, and botocore cannot join the `s3` extra (its python-dateutil
pin conflicts with the kubernetes client's), hence these few lines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

from ground.contract import OutputUpload

ALGORITHM = "AWS4-HMAC-SHA256"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signature(policy_b64: str, secret_key: str, date: str, region: str) -> str:
    """The SigV4 signature of a base64 policy, `date` as YYYYMMDD."""
    key = _hmac(("AWS4" + secret_key).encode(), date)
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, policy_b64.encode(), hashlib.sha256).hexdigest()


def presigned_post(
    *,
    url: str,
    bucket: str,
    key_prefix: str,
    access_key: str,
    secret_key: str,
    region: str,
    ttl_s: int,
    max_bytes: int,
    session_token: str | None = None,
    now: float | None = None,
) -> OutputUpload:
    at = time.time() if now is None else now
    stamp = datetime.fromtimestamp(at, UTC)
    date = stamp.strftime("%Y%m%d")
    amz_date = stamp.strftime("%Y%m%dT%H%M%SZ")
    expires = at + ttl_s
    fields = {
        "x-amz-algorithm": ALGORITHM,
        "x-amz-credential": f"{access_key}/{date}/{region}/s3/aws4_request",
        "x-amz-date": amz_date,
    }
    if session_token:
        fields["x-amz-security-token"] = session_token
    conditions: list[object] = [
        {"bucket": bucket},
        ["starts-with", "$key", key_prefix],
        ["content-length-range", 0, max_bytes],
        *({k: v} for k, v in fields.items()),
    ]
    policy = {
        "expiration": datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "conditions": conditions,
    }
    policy_b64 = base64.b64encode(json.dumps(policy).encode()).decode()
    fields["policy"] = policy_b64
    fields["x-amz-signature"] = signature(policy_b64, secret_key, date, region)
    return OutputUpload(url=url, fields=fields, key_prefix=key_prefix, expires_at=expires)


__all__ = ["presigned_post", "signature"]
