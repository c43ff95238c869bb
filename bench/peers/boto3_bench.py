#!/usr/bin/env python3
"""Baseline peer benchmark: plain boto3 PutRecords / GetRecords loops.

    boto3_bench.py put --endpoint URL --stream NAME --count N --size BYTES
    boto3_bench.py get --endpoint URL --stream NAME --count N [--timeout S]

The last stdout line is one JSON object, e.g.
{"records": 20000, "seconds": 1.23, "failed": 0, ...}.
Errors go to stderr with a nonzero exit status.
"""

import argparse
import json
import sys
import time

import boto3
from botocore.config import Config

BATCH = 500  # PutRecords hard limit
MAX_RETRY_ROUNDS = 100  # per batch; guards against an endless retry loop


def make_client(endpoint):
    # Local emulator: any credentials are accepted. "standard" retry mode makes
    # botocore retry throttling errors (e.g. ProvisionedThroughputExceeded on
    # GetRecords) with backoff instead of raising at once.
    return boto3.client(
        "kinesis",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(retries={"mode": "standard", "max_attempts": 10}),
    )


def payload(i, size):
    # Deterministic and unique per record: the index, padded with b"x".
    return str(i).encode().ljust(size, b"x")[:size]


def put(args):
    kinesis = make_client(args.endpoint)
    retried = 0
    start = time.perf_counter()
    for base in range(0, args.count, BATCH):
        entries = [
            {"Data": payload(i, args.size), "PartitionKey": f"key-{i % 64}"}
            for i in range(base, min(base + BATCH, args.count))
        ]
        for _ in range(MAX_RETRY_ROUNDS):
            resp = kinesis.put_records(StreamName=args.stream, Records=entries)
            if resp["FailedRecordCount"] == 0:
                break
            # Response entries line up with request entries; failed ones carry ErrorCode.
            entries = [e for e, r in zip(entries, resp["Records"]) if "ErrorCode" in r]
            retried += len(entries)
        else:
            raise RuntimeError(f"{len(entries)} records still failing after {MAX_RETRY_ROUNDS} rounds")
    seconds = time.perf_counter() - start
    return {"records": args.count, "seconds": round(seconds, 4), "failed": 0, "retried": retried}


def list_all_shards(kinesis, stream):
    shards, kwargs = [], {"StreamName": stream}
    while True:
        resp = kinesis.list_shards(**kwargs)
        shards += [s["ShardId"] for s in resp["Shards"]]
        if not resp.get("NextToken"):
            return shards
        kwargs = {"NextToken": resp["NextToken"]}  # NextToken excludes StreamName


def get(args):
    kinesis = make_client(args.endpoint)
    start = time.perf_counter()
    iterators = {
        sid: kinesis.get_shard_iterator(
            StreamName=args.stream, ShardId=sid, ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        for sid in list_all_shards(kinesis, args.stream)
    }
    total = calls = 0
    while total < args.count:
        if not iterators:
            raise RuntimeError(f"all shards closed after {total} of {args.count} records")
        if time.perf_counter() - start > args.timeout:
            raise RuntimeError(f"timed out after {total} of {args.count} records")
        # Round-robin: one GetRecords per open shard per pass.
        for sid in list(iterators):
            resp = kinesis.get_records(ShardIterator=iterators[sid], Limit=10000)
            calls += 1
            total += len(resp["Records"])
            if resp.get("NextShardIterator"):
                iterators[sid] = resp["NextShardIterator"]
            else:
                del iterators[sid]  # closed shard, fully read
            if total >= args.count:
                break
            if not resp["Records"]:
                time.sleep(0.05)  # only back off when a shard had nothing new
    seconds = time.perf_counter() - start
    return {"records": total, "seconds": round(seconds, 4), "failed": 0, "calls": calls}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("put", "get"):
        p = sub.add_parser(name)
        p.add_argument("--endpoint", required=True)
        p.add_argument("--stream", required=True)
        p.add_argument("--count", type=int, required=True)
        if name == "put":
            p.add_argument("--size", type=int, required=True)
        else:
            p.add_argument("--timeout", type=float, default=300.0, help="give up after S seconds")
    args = parser.parse_args()
    try:
        result = put(args) if args.cmd == "put" else get(args)
    except Exception as exc:  # report any failure as an error exit
        print(f"boto3_bench {args.cmd} failed: {exc!r}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
