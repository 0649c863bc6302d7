#!/usr/bin/env python3
"""Times aws_kinesis_agg's RecordAggregator on the workload of
ext/kinesis_core/benches/aggregation.rs, for scale.

  py_aggregate_bench.py --records N --size BYTES --keys aggregate|record

Random user data (a pool of payloads, cycled) is made before the clock starts; the timed part
adds every record and serializes each full aggregate (protobuf + MD5, via get_contents()).
--keys aggregate: one random 32-hex-digit key per aggregate; record: a distinct key per record.
Prints one line: `records_per_s <n> mb_per_s <n>` (MB = 10^6 bytes of user data).
Exit status 3 when the library is not installed.
"""
import argparse
import os
import sys
import time

try:
    from aws_kinesis_agg.aggregator import RecordAggregator
except ImportError as e:
    sys.stderr.write("aws_kinesis_agg cannot be imported (%s): run `pip install -r test/support/requirements.txt`\n" % e)
    sys.exit(3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--keys", choices=["aggregate", "record"], required=True)
    args = parser.parse_args()

    payloads = [os.urandom(args.size) for _ in range(1024)]
    if args.keys == "record":
        keys = [os.urandom(16).hex() for _ in range(args.records)]
    else:
        keys = [os.urandom(16).hex() for _ in range(4096)]

    aggregator = RecordAggregator()
    aggregates = 0
    start = time.perf_counter()
    for i in range(args.records):
        key = keys[i] if args.keys == "record" else keys[aggregates % len(keys)]
        full = aggregator.add_user_record(key, payloads[i % len(payloads)])
        if full is not None:
            full.get_contents()
            aggregates += 1
    last = aggregator.clear_and_get()
    if last is not None:
        last.get_contents()
    elapsed = time.perf_counter() - start
    print("records_per_s %.0f mb_per_s %.2f" % (args.records / elapsed, args.records * args.size / elapsed / 1e6))


if __name__ == "__main__":
    main()
