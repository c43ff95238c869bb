"""Bridge to awslabs' aws-kinesis-agg, the independent KPL-format
implementation Convoy's aggregation is checked against.

Every field is hex, fields are separated by tabs, an absent explicit hash
key is an empty field.

  kpl_interop.py aggregate    stdin:  partition_key, explicit_hash_key, data (user records)
                              stdout: partition_key, explicit_hash_key, data (aggregated records)
  kpl_interop.py deaggregate  stdin:  partition_key, data (raw Kinesis records)
                              stdout: partition_key, explicit_hash_key, data, sub_sequence_number (decimal)
"""
import base64
import datetime
import sys

from aws_kinesis_agg.aggregator import RecordAggregator
from aws_kinesis_agg.deaggregator import iter_deaggregate_records
from aws_kinesis_agg.messages_pb2 import AggregatedRecord


def aggregate():
    aggregator = RecordAggregator()
    out = []
    for line in sys.stdin:
        key, ehk, data = (bytes.fromhex(f) for f in line.rstrip("\n").split("\t"))
        full = aggregator.add_user_record(key.decode(), data, ehk.decode() or None)
        if full is not None:
            out.append(full)
    if aggregator.get_num_user_records() > 0:
        out.append(aggregator.clear_and_get())
    for record in out:
        key, ehk, data = record.get_contents()
        print("\t".join([key.encode().hex(), (ehk or "").encode().hex(), data.hex()]))


def deaggregate():
    raw = []
    for n, line in enumerate(sys.stdin):
        key_hex, data_hex = line.rstrip("\n").split("\t")
        raw.append({
            "SequenceNumber": str(n),
            "PartitionKey": bytes.fromhex(key_hex).decode(),
            "ApproximateArrivalTimestamp": datetime.datetime.now(),
            "Data": bytes.fromhex(data_hex),
        })
    for source in raw:
        for record in iter_deaggregate_records([dict(source)], data_format="Boto3"):
            k = record["kinesis"]
            data = k["data"]
            data = base64.b64decode(data) if k.get("aggregated") else data
            ehk = explicit_hash_key(source["Data"], k.get("subSequenceNumber"))
            fields = [k["partitionKey"].encode().hex(), (ehk or "").encode().hex(), data.hex()]
            print("\t".join(fields + [str(k.get("subSequenceNumber"))]))


def explicit_hash_key(aggregated, sub_sequence_number):
    """aws-kinesis-agg 1.2.3's deaggregator reads an unset (proto2 optional)
    explicit_hash_key_index as 0, so it gives every user record without an
    explicit hash key the table's first one. Read the field with HasField,
    from the same package's protobuf messages, as the KCL does."""
    if sub_sequence_number is None:
        return None
    message = AggregatedRecord.FromString(aggregated[4:-16])
    record = message.records[sub_sequence_number]
    if not record.HasField("explicit_hash_key_index"):
        return None
    return message.explicit_hash_key_table[record.explicit_hash_key_index]


if __name__ == "__main__":
    {"aggregate": aggregate, "deaggregate": deaggregate}[sys.argv[1]]()
