"""Make the S3 bucket named by KERAS_SERVE_IMAGE_STORE (s3://bucket/prefix) if it is missing.

compose.yaml runs this once, in the app's own image (boto3 is in it), before the app starts:
the app checks that its bucket exists (/readyz) and does not create it, since on a real S3
account buckets belong to the operator. Endpoint and credentials come from AWS_*.
"""
import os
import sys
import time
from urllib.parse import urlsplit

import boto3
from botocore.exceptions import BotoCoreError, ClientError

bucket = urlsplit(os.environ["KERAS_SERVE_IMAGE_STORE"]).netloc
s3 = boto3.client("s3")
for _ in range(30):  # about a minute while the store starts
    try:
        s3.create_bucket(Bucket=bucket)
        print(f"created bucket {bucket}")
        sys.exit(0)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            print(f"bucket {bucket} exists")
            sys.exit(0)
        error = exc
    except BotoCoreError as exc:  # the store is still starting
        error = exc
    time.sleep(2)
print(f"error: could not create bucket {bucket}: {error}", file=sys.stderr)
sys.exit(1)
