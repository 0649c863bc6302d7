#!/usr/bin/env python3
"""Admin and reader side of the Firehose tests, against a local moto server (Firehose + S3).

  firehose_admin.py create ENDPOINT NAME     a bucket NAME-bucket and a direct PUT delivery stream NAME
                                             writing to it (ExtendedS3), ACTIVE
  firehose_admin.py read ENDPOINT NAME       every object of the bucket, as JSON:
                                             {"objects": [{"key", "data" (base64), "size"}...]}

moto writes each PutRecordBatch call's records, concatenated, as one S3 object (no buffering), so
the objects are the calls that delivered something, and their bytes what Firehose would write.
"""
import base64
import json
import sys

import boto3
from botocore.config import Config

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/firehose-test"


def client(service, endpoint):
    return boto3.client(
        service, endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id="AKIDTEST", aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 10, "mode": "standard"}, s3={"addressing_style": "path"}))


def create(endpoint, name):
    bucket = f"{name}-bucket".lower()
    client("s3", endpoint).create_bucket(Bucket=bucket)
    client("firehose", endpoint).create_delivery_stream(
        DeliveryStreamName=name, DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            # CompressionFormat as the service reports it: moto leaves it out of its description
            # otherwise, and the AWS SDK for Rust refuses such an answer.
            "RoleARN": ROLE, "BucketARN": f"arn:aws:s3:::{bucket}", "Prefix": "logs/", "CompressionFormat": "UNCOMPRESSED",
            "BufferingHints": {"SizeInMBs": 1, "IntervalInSeconds": 60}})


def read(endpoint, name):
    s3 = client("s3", endpoint)
    bucket = f"{name}-bucket".lower()
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            data = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            objects.append({"key": o["Key"], "size": len(data), "data": base64.b64encode(data).decode()})
    json.dump({"objects": objects}, sys.stdout)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"create": create, "read": read}[cmd](*args)
