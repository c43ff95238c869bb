//! The KPL aggregated record format, as the AWS KPL writes it and the KCL
//! reads it: the magic bytes `F3 89 9A C2`, a protobuf `AggregatedRecord`
//! with partition-key and explicit-hash-key tables, then the 16-byte MD5 of
//! the protobuf bytes.
//!
//! [`Aggregator`] packs user records and knows its exact encoded size as it
//! grows; [`deaggregate`] unpacks, and answers `None` for anything that only
//! looks aggregated (short, bad digest, bad protobuf), which callers then
//! treat as a plain record, as the KCL does.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use md5::{Digest, Md5};
use prost::encoding::{encode_varint, encoded_len_varint};
use prost::Message;

pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;

/// Default upper bound of one aggregated record, as the KPL uses.
pub const DEFAULT_MAX_BYTES: usize = 50 * 1024;

#[derive(Clone, PartialEq, Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Record {
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    pub data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Tag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// One user record inside an aggregated record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Vec<u8>,
}

/// Bytes a length-delimited field of `len` bytes takes, tag included
/// (every tag here is below 16, so one byte).
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn record_len(key_index: u64, hash_key_index: Option<u64>, data_len: usize) -> usize {
    1 + encoded_len_varint(key_index)
        + hash_key_index.map_or(0, |i| 1 + encoded_len_varint(i))
        + field_len(data_len)
}

/// Packs user records into one aggregated record. Each record is encoded
/// as it is added (its data copied once, no allocation per record); the
/// key tables are written before the records when the aggregate is
/// finished, in the field order the KPL writes.
#[derive(Debug, Default)]
pub struct Aggregator {
    partition_keys: Vec<String>,
    explicit_hash_keys: Vec<String>,
    /// Looked up once or twice per record added: foldhash, not SipHash
    /// (5% of the runtime's samples in a profile of the aggregated producer).
    key_index: HashMap<String, u64, RandomState>,
    hash_key_index: HashMap<String, u64, RandomState>,
    /// The `records` fields (tag 3), encoded.
    records: Vec<u8>,
    count: usize,
    /// Encoded length of the whole message, kept exact as records are added.
    proto_len: usize,
}

const TAG_PARTITION_KEY_TABLE: u8 = 1 << 3 | 2;
const TAG_EXPLICIT_HASH_KEY_TABLE: u8 = 2 << 3 | 2;
const TAG_RECORDS: u8 = 3 << 3 | 2;
const TAG_RECORD_KEY_INDEX: u8 = 1 << 3;
const TAG_RECORD_HASH_KEY_INDEX: u8 = 2 << 3;
const TAG_RECORD_DATA: u8 = 3 << 3 | 2;

/// Where a user record's keys stand in the tables, and whether adding it
/// adds them.
#[derive(Debug, Clone, Copy)]
struct Indexes {
    key: u64,
    new_key: bool,
    hash_key: Option<u64>,
    new_hash_key: bool,
}

/// A user record measured against an [`Aggregator`] ([`Aggregator::measure`]):
/// where its keys would go and by how many bytes it would grow the record,
/// so that [`Aggregator::add_measured`] adds it without looking its keys up
/// in the tables again.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    indexes: Indexes,
    growth: usize,
}

impl Measured {
    /// By how many bytes adding the record grows the finished record.
    pub fn growth(&self) -> usize {
        self.growth
    }
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The size of the finished record (magic, protobuf, digest).
    pub fn encoded_len(&self) -> usize {
        MAGIC.len() + self.proto_len + DIGEST_LEN
    }

    fn indexes(&self, partition_key: &str, explicit_hash_key: Option<&str>) -> Indexes {
        let (key, new_key) = match self.key_index.get(partition_key) {
            Some(i) => (*i, false),
            None => (self.partition_keys.len() as u64, true),
        };
        let (hash_key, new_hash_key) = match explicit_hash_key {
            None => (None, false),
            Some(ehk) => match self.hash_key_index.get(ehk) {
                Some(i) => (Some(*i), false),
                None => (Some(self.explicit_hash_keys.len() as u64), true),
            },
        };
        Indexes {
            key,
            new_key,
            hash_key,
            new_hash_key,
        }
    }

    fn growth(
        indexes: &Indexes,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data_len: usize,
    ) -> usize {
        let mut grow = field_len(record_len(indexes.key, indexes.hash_key, data_len));
        if indexes.new_key {
            grow += field_len(partition_key.len());
        }
        if let (true, Some(ehk)) = (indexes.new_hash_key, explicit_hash_key) {
            grow += field_len(ehk.len());
        }
        grow
    }

    /// The size of a finished record holding only this user record: what
    /// `Aggregator::new().encoded_len_with(..)` answers, without building one.
    pub fn single_len(
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data_len: usize,
    ) -> usize {
        MAGIC.len()
            + DIGEST_LEN
            + field_len(partition_key.len())
            + explicit_hash_key.map_or(0, |ehk| field_len(ehk.len()))
            + field_len(record_len(0, explicit_hash_key.map(|_| 0), data_len))
    }

    /// The size the finished record would have with this user record added.
    pub fn encoded_len_with(
        &self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data_len: usize,
    ) -> usize {
        self.encoded_len()
            + self
                .measure(partition_key, explicit_hash_key, data_len)
                .growth
    }

    /// Measures a user record against this aggregator as it is now, for
    /// [`Aggregator::add_measured`].
    pub fn measure(
        &self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data_len: usize,
    ) -> Measured {
        let indexes = self.indexes(partition_key, explicit_hash_key);
        Measured {
            indexes,
            growth: Self::growth(&indexes, partition_key, explicit_hash_key, data_len),
        }
    }

    pub fn add(&mut self, partition_key: &str, explicit_hash_key: Option<&str>, data: &[u8]) {
        let measured = self.measure(partition_key, explicit_hash_key, data.len());
        self.add_measured(measured, partition_key, explicit_hash_key, data);
    }

    /// Adds a user record measured by [`Aggregator::measure`] with the same
    /// keys and data length, with no record added since: what `add` does,
    /// without looking its keys up again.
    pub fn add_measured(
        &mut self,
        measured: Measured,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: &[u8],
    ) {
        let Measured { indexes, growth } = measured;
        debug_assert_eq!(
            growth,
            self.measure(partition_key, explicit_hash_key, data.len())
                .growth
        );
        self.proto_len += growth;
        if indexes.new_key {
            self.partition_keys.push(partition_key.to_owned());
            self.key_index.insert(partition_key.to_owned(), indexes.key);
        }
        if let (true, Some(ehk), Some(i)) =
            (indexes.new_hash_key, explicit_hash_key, indexes.hash_key)
        {
            self.explicit_hash_keys.push(ehk.to_owned());
            self.hash_key_index.insert(ehk.to_owned(), i);
        }
        let out = &mut self.records;
        out.push(TAG_RECORDS);
        encode_varint(
            record_len(indexes.key, indexes.hash_key, data.len()) as u64,
            out,
        );
        out.push(TAG_RECORD_KEY_INDEX);
        encode_varint(indexes.key, out);
        if let Some(i) = indexes.hash_key {
            out.push(TAG_RECORD_HASH_KEY_INDEX);
            encode_varint(i, out);
        }
        out.push(TAG_RECORD_DATA);
        encode_varint(data.len() as u64, out);
        out.extend_from_slice(data);
        self.count += 1;
    }

    /// The partition key of the first record: Kinesis routes the aggregated
    /// record with it, so it lands where its first user record would.
    pub fn first_partition_key(&self) -> Option<&str> {
        self.partition_keys.first().map(String::as_str)
    }

    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.finish_into(&mut out);
        out
    }

    /// Appends the finished record to `out`.
    pub fn finish_into(self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        let proto_start = out.len();
        for (tag, table) in [
            (TAG_PARTITION_KEY_TABLE, &self.partition_keys),
            (TAG_EXPLICIT_HASH_KEY_TABLE, &self.explicit_hash_keys),
        ] {
            for entry in table {
                out.push(tag);
                encode_varint(entry.len() as u64, out);
                out.extend_from_slice(entry.as_bytes());
            }
        }
        out.extend_from_slice(&self.records);
        debug_assert_eq!(out.len() - proto_start, self.proto_len);
        let digest = Md5::digest(&out[proto_start..]);
        out.extend_from_slice(&digest);
    }
}

/// Whether `data` starts like an aggregated record (it may still be corrupt).
pub fn looks_aggregated(data: &[u8]) -> bool {
    data.len() > MAGIC.len() + DIGEST_LEN && data.starts_with(&MAGIC)
}

/// The user records of an aggregated record, or `None` when `data` is not a
/// valid one.
pub fn deaggregate(data: &[u8]) -> Option<Vec<UserRecord>> {
    unpack(data).ok()
}

/// Why a record that starts like an aggregated one cannot be unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpack {
    /// Not aggregated at all (no magic, or too short): a plain record.
    Plain,
    /// The MD5 trailer does not match the protobuf bytes.
    BadChecksum,
    /// The digest matches, but the bytes are not a valid `AggregatedRecord`.
    Malformed,
}

/// The user records of an aggregated record (possibly none), or why `data`
/// is not a valid one.
pub fn unpack(data: &[u8]) -> Result<Vec<UserRecord>, Unpack> {
    if !looks_aggregated(data) {
        return Err(Unpack::Plain);
    }
    let (proto, digest) = data[MAGIC.len()..].split_at(data.len() - MAGIC.len() - DIGEST_LEN);
    if Md5::digest(proto).as_slice() != digest {
        return Err(Unpack::BadChecksum);
    }
    let message = AggregatedRecord::decode(proto).map_err(|_| Unpack::Malformed)?;
    let users: Option<Vec<UserRecord>> = message
        .records
        .into_iter()
        .map(|r| {
            let partition_key = message
                .partition_key_table
                .get(usize::try_from(r.partition_key_index).ok()?)?
                .clone();
            let explicit_hash_key = match r.explicit_hash_key_index {
                Some(i) => Some(
                    message
                        .explicit_hash_key_table
                        .get(usize::try_from(i).ok()?)?
                        .clone(),
                ),
                None => None,
            };
            Some(UserRecord {
                partition_key,
                explicit_hash_key,
                data: r.data,
            })
        })
        .collect();
    users.ok_or(Unpack::Malformed)
}

/// The 128-bit hash Kinesis uses to map a partition key to a shard.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// Shards by hash-key range, to group records by the shard they will reach.
#[derive(Debug, Clone, Default)]
pub struct ShardMap {
    /// (starting hash key, ending hash key, shard id), sorted by start.
    ranges: Vec<(u128, u128, String)>,
}

impl ShardMap {
    /// From open shards' `(shard_id, starting_hash_key, ending_hash_key)`,
    /// as decimal strings; unparsable entries are skipped.
    pub fn new<'a>(shards: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) -> Self {
        let mut ranges: Vec<_> = shards
            .into_iter()
            .filter_map(|(id, start, end)| {
                Some((start.parse().ok()?, end.parse().ok()?, id.to_owned()))
            })
            .collect();
        ranges.sort();
        ShardMap { ranges }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn shard_for(&self, hash: u128) -> Option<&str> {
        self.index_for(hash).map(|i| self.id(i))
    }

    /// The position of the shard whose range holds `hash`, for grouping
    /// records without copying shard ids; [`ShardMap::id`] names it.
    pub fn index_for(&self, hash: u128) -> Option<usize> {
        let index = self.ranges.partition_point(|(start, _, _)| *start <= hash);
        let index = index.checked_sub(1)?;
        (hash <= self.ranges[index].1).then_some(index)
    }

    /// The id of the shard at `index` (from [`ShardMap::index_for`]).
    pub fn id(&self, index: usize) -> &str {
        &self.ranges[index].2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn aggregate(records: &[UserRecord]) -> (Vec<u8>, usize) {
        let mut agg = Aggregator::new();
        let mut predicted = agg.encoded_len();
        for r in records {
            predicted = agg.encoded_len_with(
                &r.partition_key,
                r.explicit_hash_key.as_deref(),
                r.data.len(),
            );
            agg.add(&r.partition_key, r.explicit_hash_key.as_deref(), &r.data);
            assert_eq!(agg.encoded_len(), predicted);
        }
        (agg.finish(), predicted)
    }

    /// The same through `measure` and `add_measured`.
    fn aggregate_measured(records: &[UserRecord]) -> Vec<u8> {
        let mut agg = Aggregator::new();
        for r in records {
            let (key, ehk) = (r.partition_key.as_str(), r.explicit_hash_key.as_deref());
            let measured = agg.measure(key, ehk, r.data.len());
            let before = agg.encoded_len();
            agg.add_measured(measured, key, ehk, &r.data);
            assert_eq!(agg.encoded_len(), before + measured.growth());
        }
        agg.finish()
    }

    fn user(key: &str, ehk: Option<&str>, data: &[u8]) -> UserRecord {
        UserRecord {
            partition_key: key.into(),
            explicit_hash_key: ehk.map(Into::into),
            data: data.to_vec(),
        }
    }

    #[test]
    fn round_trip_with_shared_keys_and_hash_keys() {
        let records = vec![
            user("a", None, b"one"),
            user("b", Some("42"), b""),
            user("a", Some("42"), &[0xF3, 0x89, 0x9A, 0xC2]),
            user("c", None, &[0; 300]),
        ];
        let (bytes, predicted) = aggregate(&records);
        assert_eq!(bytes.len(), predicted);
        assert!(bytes.starts_with(&MAGIC));
        assert_eq!(deaggregate(&bytes).unwrap(), records);
    }

    #[test]
    fn corrupt_input_is_not_aggregated() {
        let (mut bytes, _) = aggregate(&[user("k", None, b"payload")]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1; // digest
        assert_eq!(deaggregate(&bytes), None);
        assert_eq!(deaggregate(&MAGIC), None);
        assert_eq!(deaggregate(b"plain data"), None);
        // Right magic and digest, but not a protobuf AggregatedRecord.
        let mut fake = MAGIC.to_vec();
        let junk = [0xFFu8; 8];
        fake.extend_from_slice(&junk);
        fake.extend_from_slice(&Md5::digest(junk));
        assert_eq!(deaggregate(&fake), None);
    }

    #[test]
    fn unpack_says_why() {
        let (mut bytes, _) = aggregate(&[user("k", None, b"payload")]);
        assert_eq!(unpack(b"plain data"), Err(Unpack::Plain));
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(unpack(&bytes), Err(Unpack::BadChecksum));
        let mut fake = MAGIC.to_vec();
        let junk = [0xFFu8; 8];
        fake.extend_from_slice(&junk);
        fake.extend_from_slice(&Md5::digest(junk));
        assert_eq!(unpack(&fake), Err(Unpack::Malformed));
        // A valid aggregated record holding no user record.
        let message = AggregatedRecord {
            partition_key_table: vec!["k".into()],
            explicit_hash_key_table: vec![],
            records: vec![],
        };
        let proto = message.encode_to_vec();
        let mut empty = MAGIC.to_vec();
        empty.extend_from_slice(&proto);
        empty.extend_from_slice(&Md5::digest(&proto));
        assert_eq!(unpack(&empty), Ok(vec![]));
    }

    #[test]
    fn a_key_index_out_of_the_table_is_corrupt() {
        let message = AggregatedRecord {
            partition_key_table: vec!["k".into()],
            explicit_hash_key_table: vec![],
            records: vec![Record {
                partition_key_index: 3,
                explicit_hash_key_index: None,
                data: b"x".to_vec(),
                tags: vec![],
            }],
        };
        let mut bytes = MAGIC.to_vec();
        let proto = message.encode_to_vec();
        bytes.extend_from_slice(&proto);
        bytes.extend_from_slice(&Md5::digest(&proto));
        assert_eq!(deaggregate(&bytes), None);
    }

    #[test]
    fn single_len_is_an_empty_aggregators_prediction() {
        for (key, ehk, len) in [
            ("k", None, 0),
            ("key", Some("42"), 300),
            ("é", Some("0"), 5),
        ] {
            assert_eq!(
                Aggregator::single_len(key, ehk, len),
                Aggregator::new().encoded_len_with(key, ehk, len)
            );
        }
    }

    #[test]
    fn size_limit_is_respected_by_prediction() {
        let mut agg = Aggregator::new();
        let mut count = 0;
        while agg.encoded_len_with("key", None, 100) <= DEFAULT_MAX_BYTES {
            agg.add("key", None, &[7; 100]);
            count += 1;
        }
        assert!(count > 400);
        assert!(agg.finish().len() <= DEFAULT_MAX_BYTES);
    }

    #[test]
    fn shard_map_finds_the_range() {
        let max = u128::MAX.to_string();
        let half = (u128::MAX / 2).to_string();
        let half1 = (u128::MAX / 2 + 1).to_string();
        let map = ShardMap::new([
            ("s1", half1.as_str(), max.as_str()),
            ("s0", "0", half.as_str()),
        ]);
        assert_eq!(map.shard_for(0), Some("s0"));
        assert_eq!(map.shard_for(u128::MAX / 2), Some("s0"));
        assert_eq!(map.shard_for(u128::MAX / 2 + 1), Some("s1"));
        assert_eq!(map.shard_for(u128::MAX), Some("s1"));
        assert_eq!(ShardMap::default().shard_for(5), None);
    }

    #[test]
    fn hash_key_is_md5_big_endian() {
        // md5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e);
    }

    proptest! {
        #[test]
        fn any_records_round_trip(records in prop::collection::vec(
            ("[a-z]{1,8}", prop::option::of("[0-9]{1,38}"), prop::collection::vec(any::<u8>(), 0..200)),
            1..40,
        )) {
            let records: Vec<UserRecord> = records
                .into_iter()
                .map(|(k, e, d)| UserRecord { partition_key: k, explicit_hash_key: e, data: d })
                .collect();
            let (bytes, predicted) = aggregate(&records);
            prop_assert_eq!(bytes.len(), predicted);
            prop_assert_eq!(&bytes, &aggregate_measured(&records));
            prop_assert_eq!(deaggregate(&bytes).unwrap(), records);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&data);
            let _ = deaggregate(&data);
            let _ = deaggregate(&with_magic);
        }
    }
}
