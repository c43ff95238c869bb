//! `%Convoy.Record{}`, built in Rust so Elixir receives records ready to
//! use. Aggregated Kinesis records are expanded into their user records here.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use aws_sdk_kinesis::types::Record;
use rustler::{Binary, Encoder, Env, NewBinary, Term};

use crate::atoms;
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

fn expand<'r>(
    record: &'r Record,
    delivered: &mut Vec<Delivered<'r>>,
    unparseable: &mut Vec<Unparseable>,
) {
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
            return;
        }
        Ok(users) => {
            let users = users.into_iter().enumerate();
            delivered.extend(users.map(|(index, user)| Delivered {
                data: Cow::Owned(user.data),
                partition_key: Cow::Owned(user.partition_key),
                sequence_number,
                arrival_ms,
                sub_sequence_number: Some(index as u64),
                explicit_hash_key: user.explicit_hash_key,
            }));
            return;
        }
        Err(aggregation::Unpack::Plain) => {}
        Err(aggregation::Unpack::BadChecksum) => noted("bad_checksum"),
        Err(aggregation::Unpack::Malformed) => noted("malformed_aggregate"),
    }
    delivered.push(Delivered {
        data: Cow::Borrowed(data),
        partition_key: Cow::Borrowed(record.partition_key().unwrap_or_default()),
        sequence_number,
        arrival_ms,
        sub_sequence_number: None,
        explicit_hash_key: None,
    });
}

/// What every record of a batch shares: its shard and the queue's `stream_id`.
pub struct Origin<'a> {
    pub shard_id: Term<'a>,
    pub stream_id: Term<'a>,
}

/// Data of at most this many bytes is a heap binary, copied with its record.
const HEAP_BINARY_MAX: usize = 64;

/// Data of more than `HEAP_BINARY_MAX` and at most `PACKED_MAX` bytes is a
/// sub-binary of a binary of at most `CHUNK_BYTES` that the records read
/// with it share: one off-heap binary for hundreds of small records instead
/// of one each (each is an allocation, a reference count, an entry in the
/// receiving process's off-heap list, and a free when it is collected). A
/// record a handler keeps therefore keeps up to `CHUNK_BYTES` of data alive
/// (documented in `Convoy.Record`). Larger data gets a binary of its own.
const CHUNK_BYTES: usize = 64 * 1024;
const PACKED_MAX: usize = 4 * 1024;

fn packed(len: usize) -> bool {
    len > HEAP_BINARY_MAX && len <= PACKED_MAX
}

fn own_binary<'a>(env: Env<'a>, data: &[u8]) -> Term<'a> {
    let mut binary = NewBinary::new(env, data.len());
    binary.as_mut_slice().copy_from_slice(data);
    binary.into()
}

/// The `data` terms of `delivered`, in order: runs of records whose data
/// is packed (see `CHUNK_BYTES`) share a binary.
fn encode_data<'a>(env: Env<'a>, delivered: &[Delivered]) -> Vec<Term<'a>> {
    let mut terms = Vec::with_capacity(delivered.len());
    let mut i = 0;
    while i < delivered.len() {
        let mut end = i;
        let mut total = 0;
        while let Some(d) = delivered.get(end) {
            let len = d.data.len();
            if !packed(len) || total + len > CHUNK_BYTES {
                break;
            }
            total += len;
            end += 1;
        }
        if end <= i + 1 {
            terms.push(own_binary(env, &delivered[i].data));
            i += 1;
            continue;
        }
        let mut chunk = NewBinary::new(env, total);
        let mut offset = 0;
        for d in &delivered[i..end] {
            chunk.as_mut_slice()[offset..offset + d.data.len()].copy_from_slice(&d.data);
            offset += d.data.len();
        }
        let chunk: Binary<'a> = chunk.into();
        let mut offset = 0;
        for d in &delivered[i..end] {
            let len = d.data.len();
            // SAFETY: offset + len <= total, the chunk's size.
            terms.push(unsafe { chunk.make_subbinary_unchecked(offset, len) }.to_term(env));
            offset += len;
        }
        i = end;
    }
    terms
}

/// The keys of `%Convoy.Record{}` in the VM's term order (atoms compare by
/// name), the order of a small map's keys: `enif_make_map_from_arrays`
/// then finds them sorted.
const STRUCT: usize = 0;
const ARRIVAL: usize = 1;
const DATA: usize = 2;
const EXPLICIT_HASH_KEY: usize = 3;
const PARTITION_KEY: usize = 4;
const SEQUENCE_NUMBER: usize = 5;
const SHARD_ID: usize = 6;
const STREAM_ID: usize = 7;
const SUB_SEQUENCE_NUMBER: usize = 8;
const FIELDS: usize = 9;

/// Builds the `%Convoy.Record{}` maps of one message.
struct RecordMaps<'a> {
    env: Env<'a>,
    keys: [Term<'a>; FIELDS],
    /// The values every record of the batch shares (`__struct__`,
    /// `shard_id`, `stream_id`); the others are placeholders.
    template: [Term<'a>; FIELDS],
}

impl<'a> RecordMaps<'a> {
    fn new(env: Env<'a>, origin: &Origin<'a>) -> Self {
        let keys = [
            atoms::struct_(),
            atoms::approximate_arrival_timestamp(),
            atoms::data(),
            atoms::explicit_hash_key(),
            atoms::partition_key(),
            atoms::sequence_number(),
            atoms::shard_id(),
            atoms::stream_id(),
            atoms::sub_sequence_number(),
        ]
        .map(|a| a.encode(env));
        let nil = atoms::nil().encode(env);
        let mut template = [nil; FIELDS];
        template[STRUCT] = atoms::elixir_convoy_record().encode(env);
        template[SHARD_ID] = origin.shard_id;
        template[STREAM_ID] = origin.stream_id;
        RecordMaps {
            env,
            keys,
            template,
        }
    }

    /// A record's map from its own values (those of `template` for the
    /// shared keys).
    fn make(&self, values: &[Term<'a>; FIELDS]) -> Term<'a> {
        let keys = self.keys.map(|k| k.as_c_arg());
        let values = values.map(|v| v.as_c_arg());
        let mut map = MaybeUninit::uninit();
        // SAFETY: FIELDS keys and values, all terms of this env.
        let made = unsafe {
            rustler::sys::enif_make_map_from_arrays(
                self.env.as_c_arg(),
                keys.as_ptr(),
                values.as_ptr(),
                FIELDS,
                map.as_mut_ptr(),
            )
        };
        assert!(made != 0, "distinct keys");
        // SAFETY: the call succeeded, so it wrote the map.
        unsafe { Term::new(self.env, map.assume_init()) }
    }
}

impl Delivered<'_> {
    fn to_map<'a>(
        &self,
        maps: &RecordMaps<'a>,
        data: Term<'a>,
        times: &mut DateTimes<'a>,
    ) -> Term<'a> {
        let env = maps.env;
        let mut values = maps.template;
        values[DATA] = data;
        values[PARTITION_KEY] = self.partition_key.as_ref().encode(env);
        values[SEQUENCE_NUMBER] = self.sequence_number.encode(env);
        values[ARRIVAL] = times.utc(self.arrival_ms);
        values[SUB_SEQUENCE_NUMBER] = self.sub_sequence_number.encode(env);
        values[EXPLICIT_HASH_KEY] = self.explicit_hash_key.as_deref().encode(env);
        maps.make(&values)
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
    let mut delivered = Vec::with_capacity(records.len());
    for record in records {
        expand(record, &mut delivered, unparseable);
    }
    let data = encode_data(env, &delivered);
    let maps = RecordMaps::new(env, origin);
    let mut times = DateTimes::new(env);
    let terms: Vec<Term<'a>> = delivered
        .iter()
        .zip(data)
        .map(|(d, data)| d.to_map(&maps, data, &mut times))
        .collect();
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
