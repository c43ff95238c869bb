//! `%Convoy.Record{}`, built in Rust so Elixir receives records ready to
//! use. Aggregated Kinesis records are expanded into their user records here.

use std::borrow::Cow;

use aws_sdk_kinesis::types::Record;
use rustler::{Binary, Encoder, Env, NewBinary, Term};

use crate::timestamp::DateTimes;
use convoy_core::aggregation;

/// A user record as delivered. An aggregated Kinesis record (KPL format)
/// expands into its user records; one that only looks aggregated is
/// delivered as it is, as the KCL does.
struct Delivered<'r> {
    data: Cow<'r, [u8]>,
    partition_key: Cow<'r, str>,
    sequence_number: &'r str,
    arrival_ms: i64,
    sub_sequence_number: Option<u64>,
    explicit_hash_key: Option<String>,
}

/// A Kinesis record the consumer could not unpack as it looked: an
/// aggregated record holding no user record (nothing is delivered), or one
/// whose checksum or protobuf is bad (delivered as a plain record, as the
/// KCL does). Reported to the dispatcher, which logs and counts it.
pub struct Unparseable {
    pub sequence_number: String,
    pub reason: &'static str,
}

fn expand<'r>(record: &'r Record, unparseable: &mut Vec<Unparseable>) -> Vec<Delivered<'r>> {
    let arrival_ms = record
        .approximate_arrival_timestamp()
        .and_then(|t| t.to_millis().ok())
        .unwrap_or(0);
    let sequence_number = record.sequence_number();
    let data = record.data().as_ref();
    let mut noted = |reason| {
        unparseable.push(Unparseable {
            sequence_number: sequence_number.to_owned(),
            reason,
        })
    };
    match aggregation::unpack(data) {
        Ok(users) if users.is_empty() => {
            noted("empty_aggregate");
            return vec![];
        }
        Ok(users) => {
            return users
                .into_iter()
                .enumerate()
                .map(|(index, user)| Delivered {
                    data: Cow::Owned(user.data),
                    partition_key: Cow::Owned(user.partition_key),
                    sequence_number,
                    arrival_ms,
                    sub_sequence_number: Some(index as u64),
                    explicit_hash_key: user.explicit_hash_key,
                })
                .collect();
        }
        Err(aggregation::Unpack::Plain) => {}
        Err(aggregation::Unpack::BadChecksum) => noted("bad_checksum"),
        Err(aggregation::Unpack::Malformed) => noted("malformed_aggregate"),
    }
    vec![Delivered {
        data: Cow::Borrowed(data),
        partition_key: Cow::Borrowed(record.partition_key().unwrap_or_default()),
        sequence_number,
        arrival_ms,
        sub_sequence_number: None,
        explicit_hash_key: None,
    }]
}

/// `%Convoy.Record{}`, built here so Elixir receives records ready to use.
#[derive(rustler::NifStruct)]
#[module = "Convoy.Record"]
struct RecordStruct<'a> {
    data: Binary<'a>,
    partition_key: Term<'a>,
    sequence_number: Term<'a>,
    shard_id: Term<'a>,
    approximate_arrival_timestamp: Term<'a>,
    stream_id: Term<'a>,
    sub_sequence_number: Option<u64>,
    explicit_hash_key: Term<'a>,
}

/// What every record of a batch shares: its shard and the queue's `stream_id`.
pub struct Origin<'a> {
    pub shard_id: Term<'a>,
    pub stream_id: Term<'a>,
}

impl Delivered<'_> {
    fn to_struct<'a>(
        &self,
        env: Env<'a>,
        origin: &Origin<'a>,
        times: &mut DateTimes<'a>,
    ) -> RecordStruct<'a> {
        let mut data = NewBinary::new(env, self.data.len());
        data.as_mut_slice().copy_from_slice(&self.data);
        RecordStruct {
            data: data.into(),
            partition_key: self.partition_key.as_ref().encode(env),
            sequence_number: self.sequence_number.encode(env),
            shard_id: origin.shard_id,
            approximate_arrival_timestamp: times.utc(self.arrival_ms),
            stream_id: origin.stream_id,
            sub_sequence_number: self.sub_sequence_number,
            explicit_hash_key: self.explicit_hash_key.as_deref().encode(env),
        }
    }
}

/// A list of `%Convoy.Record{}`, aggregated records expanded; the records
/// that could not be unpacked are added to `unparseable`.
pub fn encode_records<'a>(
    env: Env<'a>,
    records: &[Record],
    origin: &Origin<'a>,
    unparseable: &mut Vec<Unparseable>,
) -> Term<'a> {
    let mut terms: Vec<Term<'a>> = Vec::with_capacity(records.len());
    let mut times = DateTimes::new(env);
    for record in records {
        for delivered in expand(record, unparseable) {
            terms.push(delivered.to_struct(env, origin, &mut times).encode(env));
        }
    }
    terms.encode(env)
}

/// `[{sequence_number, reason}]`, `reason` an atom.
pub fn encode_unparseable<'a>(env: Env<'a>, unparseable: &[Unparseable]) -> Term<'a> {
    let items: Vec<Term<'a>> = unparseable
        .iter()
        .map(|u| {
            let reason = rustler::Atom::from_str(env, u.reason).expect("an atom");
            (u.sequence_number.as_str(), reason).encode(env)
        })
        .collect();
    items.encode(env)
}
