#!/usr/bin/env python3
"""Peer benchmark: aiokpl (pure-Python async KPL) with aggregation enabled.

    aiokpl_bench.py put --endpoint URL --stream NAME --count N --size BYTES
                        [--no-rate-limit] [--timeout S]

Every record's Outcome is awaited, so the time covers confirmed acknowledgement
of all N user records. The last stdout line is one JSON object, e.g.
{"records": 20000, "seconds": 1.23, "failed": 0, ...}.
Errors go to stderr with a nonzero exit status.
"""

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

from aiokpl import Config, Producer


def payload(i, size):
    # Same scheme as boto3_bench.py: the index, padded with b"x".
    return str(i).encode().ljust(size, b"x")[:size]


async def put(args):
    limits = {}
    if args.no_rate_limit:
        # aiokpl throttles itself per predicted shard to the real Kinesis limits
        # (1000 records/s, 1 MiB/s); an emulator enforces neither.
        limits = {"rate_limit_records_per_sec_per_shard": 1e12, "rate_limit_bytes_per_sec_per_shard": 1e15}
    config = Config(
        region="us-east-1",
        endpoint_url=args.endpoint,  # passed straight to aiobotocore's create_client
        aws_access_key_id="local",
        aws_secret_access_key="local",
        aggregation_enabled=True,  # KPL aggregation (the default, stated explicitly)
        **limits,
    )
    async with Producer(config) as producer:
        start = time.perf_counter()
        # put_record returns once the record is buffered (it only blocks on
        # backpressure); the Outcome resolves when the record is terminal.
        outcomes = [
            await producer.put_record(
                stream=args.stream, partition_key=f"key-{i % 64}", data=payload(i, args.size)
            )
            for i in range(args.count)
        ]
        # flush() pushes partially filled aggregates out now instead of waiting
        # for their buffering deadline; it does not wait for the sends.
        await producer.flush()
        # Records must be awaited inside the `async with`: leaving it closes
        # the pipeline and drops anything still buffered.
        results = [await o.wait() for o in outcomes]
        seconds = time.perf_counter() - start

    failures = [r for r in results if not r.success]
    if failures:
        codes = Counter(r.attempts[-1].error_code if r.attempts else None for r in failures)
        print(f"aiokpl failures by error code: {dict(codes)}", file=sys.stderr)
    return {
        "records": args.count,
        "seconds": round(seconds, 4),
        "failed": len(failures),
        "retried": sum(max(len(r.attempts) - 1, 0) for r in results),
        # Distinct sequence numbers = Kinesis-level (aggregated) records written.
        "kinesis_records": len({r.sequence_number for r in results if r.success}),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("put")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--stream", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--no-rate-limit", action="store_true",
                   help="lift aiokpl's client-side per-shard rate limit")
    # aiokpl retries ListShards forever (e.g. on a missing stream), so bound the run.
    p.add_argument("--timeout", type=float, default=300.0, help="give up after S seconds")
    args = parser.parse_args()
    try:
        result = asyncio.run(asyncio.wait_for(put(args), args.timeout))
    except TimeoutError:
        print(f"aiokpl_bench {args.cmd} failed: no result within {args.timeout}s", file=sys.stderr)
        return 1
    except Exception as exc:  # report any failure as an error exit
        print(f"aiokpl_bench {args.cmd} failed: {exc!r}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
