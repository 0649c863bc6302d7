#!/usr/bin/env python3
"""Runs the Python consumer library `aws_kinesis_agg` (pinned in test/support/requirements.txt)
for the Rust test ext/kinesis_core/tests/consumer_compat.rs.

stdin: {"jobs": [job, ...]}, one JSON document; stdout: {"library", "version", "results": [...]}
with one result per job, in order. All binary data travels as base64 strings.

  {"op": "deaggregate", "records": [{"partition_key", "data", "sequence_number"}]}
      Each Kinesis record goes through deaggregate_records() as a Lambda event record.
      result: [{"error", "user_records": [{"partition_key", "explicit_hash_key", "data",
                                           "sub_sequence_number", "aggregated"}]}]  (per record)
  {"op": "aggregate", "records": [{"partition_key", "explicit_hash_key" (or null), "data"}]}
      The records go through RecordAggregator (max 1 MiB) in order.
      result: {"aggregates": [{"partition_key", "explicit_hash_key", "data"}]}

Exit status 3 with a message on stderr when the library is not installed.
"""
import base64
import contextlib
import io
import json
import sys

INSTALL = "pip install -r test/support/requirements.txt"

try:
    from aws_kinesis_agg.aggregator import RecordAggregator
    from aws_kinesis_agg.deaggregator import deaggregate_records
except ImportError as e:  # the library itself, or `six`/`protobuf` it imports
    sys.stderr.write("aws_kinesis_agg cannot be imported (%s): run `%s`\n" % (e, INSTALL))
    sys.exit(3)


def library_version():
    from importlib import metadata

    for name in ("aws_kinesis_agg", "aws-kinesis-agg"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return "unknown"


def deaggregate(records):
    out = []
    for r in records:
        event_record = {
            "eventSource": "aws:kinesis",
            "eventID": "shardId-000000000000:" + r["sequence_number"],
            "awsRegion": "us-east-1",
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": r["partition_key"],
                "sequenceNumber": r["sequence_number"],
                "data": r["data"],
                "approximateArrivalTimestamp": 1700000000.123,
            },
        }
        # The library prints an error part-way through an aggregate to stderr and carries on.
        captured = io.StringIO()
        with contextlib.redirect_stderr(captured):
            user_records = deaggregate_records([event_record])
        users = []
        for u in user_records:
            k = u["kinesis"]
            aggregated = bool(k.get("aggregated", False))
            # Aggregated user records carry base64 *bytes*; a passed-through record is the input.
            data = k["data"].decode("ascii") if isinstance(k["data"], bytes) else k["data"]
            users.append(
                {
                    "partition_key": k["partitionKey"],
                    "explicit_hash_key": k.get("explicitHashKey"),
                    "data": data,
                    "sub_sequence_number": k.get("subSequenceNumber"),
                    "aggregated": aggregated,
                }
            )
        out.append({"error": captured.getvalue() or None, "user_records": users})
    return out


def aggregate(records):
    aggregator = RecordAggregator()
    done = []

    def contents(agg_record):
        pk, ehk, blob = agg_record.get_contents()
        return {"partition_key": pk, "explicit_hash_key": ehk, "data": base64.b64encode(blob).decode("ascii")}

    for r in records:
        full = aggregator.add_user_record(
            partition_key=r["partition_key"],
            data=base64.b64decode(r["data"]),
            explicit_hash_key=r.get("explicit_hash_key"),
        )
        if full is not None:
            done.append(contents(full))
    last = aggregator.clear_and_get()
    if last is not None:
        done.append(contents(last))
    return {"aggregates": done}


def main():
    request = json.load(sys.stdin)
    results = []
    for job in request["jobs"]:
        if job["op"] == "deaggregate":
            results.append(deaggregate(job["records"]))
        elif job["op"] == "aggregate":
            results.append(aggregate(job["records"]))
        else:
            raise ValueError("unknown op %r" % job["op"])
    json.dump({"library": "aws_kinesis_agg", "version": library_version(), "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
