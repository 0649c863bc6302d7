#!/usr/bin/env python3
"""Admin and consumer side of the tests, against a local Kinesis.

  kinesis_admin.py create ENDPOINT STREAM SHARDS     create a stream and wait until it is ACTIVE
  kinesis_admin.py read ENDPOINT STREAM              every user record of every shard, as JSON
  kinesis_admin.py split ENDPOINT STREAM             split the first open shard in two, wait until ACTIVE

`read` deaggregates with the real consumer library (aws_kinesis_agg, as an AWS Lambda consumer
does) and applies the KCL's shard-range check to each aggregate: an aggregate whose user records
do not all hash into the range of the shard it was read from is what a KCL consumer drops.
Output: {"records": [{"shard", "data" (base64), "partition_key", "explicit_hash_key",
"aggregated", "kcl_ok", "sequence_number", "arrival", "sub_sequence"}...], "kinesis_records": N,
"kcl_dropped_aggregates": N}. sequence_number (a string) and arrival (ApproximateArrivalTimestamp,
float seconds since the epoch) are the Kinesis record's, shared by the user records of an
aggregate; sub_sequence is the user record's index in its aggregate (0 when not aggregated).
"""
import base64
import hashlib
import json
import sys
import time

import boto3
from botocore.config import Config
from aws_kinesis_agg.deaggregator import iter_deaggregate_records

MAGIC = b"\xf3\x89\x9a\xc2"


def client(endpoint):
    return boto3.client(
        "kinesis", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="AKIDTEST", aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 10, "mode": "standard"}))


def create(endpoint, stream, shards):
    c = client(endpoint)
    c.create_stream(StreamName=stream, ShardCount=int(shards))
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if c.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
                # A just-created stream can still answer ResourceNotFound once (kinesalite).
                c.list_shards(StreamName=stream)
                return
        except c.exceptions.ResourceNotFoundException:
            pass
        time.sleep(0.05)
    raise SystemExit(f"stream {stream} did not become ACTIVE")


def hash_key(partition_key, explicit_hash_key):
    if explicit_hash_key is not None:
        return int(explicit_hash_key)
    return int.from_bytes(hashlib.md5(partition_key.encode("utf-8")).digest(), "big")


def read(endpoint, stream):
    c = client(endpoint)
    out, kinesis_records, dropped = [], 0, 0
    for shard in c.list_shards(StreamName=stream)["Shards"]:
        start = int(shard["HashKeyRange"]["StartingHashKey"])
        end = int(shard["HashKeyRange"]["EndingHashKey"])
        it = c.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            resp = c.get_records(ShardIterator=it, Limit=10000)
            records = resp["Records"]
            if not records:
                break
            for r in records:
                kinesis_records += 1
                users = list(iter_deaggregate_records([r], data_format="Boto3"))
                aggregated = bool(users) and "subSequenceNumber" in users[0]["kinesis"]
                ok = not aggregated or all(
                    start <= hash_key(u["kinesis"]["partitionKey"], u["kinesis"].get("explicitHashKey")) <= end for u in users)
                if not ok:
                    dropped += 1
                sequence_number = r["SequenceNumber"]
                arrival = r["ApproximateArrivalTimestamp"].timestamp()
                for sub_sequence, u in enumerate(users):
                    k = u["kinesis"]
                    # The library base64-encodes deaggregated user records (Lambda's shape) but hands
                    # back Boto3-format records it did not deaggregate as they were.
                    data = base64.b64decode(k["data"]) if aggregated else k["data"]
                    out.append({"shard": shard["ShardId"], "data": base64.b64encode(data).decode(),
                                "partition_key": k.get("partitionKey"), "explicit_hash_key": k.get("explicitHashKey"),
                                "aggregated": aggregated, "kcl_ok": ok,
                                "sequence_number": sequence_number, "arrival": arrival,
                                "sub_sequence": sub_sequence if aggregated else 0})
            it = resp.get("NextShardIterator")
    json.dump({"records": out, "kinesis_records": kinesis_records, "kcl_dropped_aggregates": dropped}, sys.stdout)


def split(endpoint, stream):
    c = client(endpoint)
    shard = next(s for s in c.list_shards(StreamName=stream)["Shards"]
                 if "EndingSequenceNumber" not in s["SequenceNumberRange"])
    start = int(shard["HashKeyRange"]["StartingHashKey"])
    end = int(shard["HashKeyRange"]["EndingHashKey"])
    c.split_shard(StreamName=stream, ShardToSplit=shard["ShardId"], NewStartingHashKey=str((start + end) // 2 + 1))
    deadline = time.time() + 20
    while time.time() < deadline:
        if c.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        time.sleep(0.05)
    raise SystemExit(f"stream {stream} did not become ACTIVE after the split")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"create": create, "read": read, "split": split}[cmd](*args)
