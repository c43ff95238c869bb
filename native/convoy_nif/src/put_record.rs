//! What `Convoy.Queue.put/3` hands over, checked against the Kinesis limits
//! and encoded once, for every service: the Kinesis producer builds its
//! entries from it and the Memory service calls `put_record_check`.

use std::borrow::Cow;

use rustler::{Binary, Encoder, Env, Term, TermType};

use crate::atoms;
use crate::error::Error;
use crate::json;
use convoy_core::validate;

/// A record ready to buffer: a valid key, data as bytes, its size as
/// Kinesis counts it.
pub struct PutRecord<'a> {
    pub key: &'a str,
    /// Borrowed from the binary that was put; owned when encoded as JSON.
    pub data: Cow<'a, [u8]>,
    pub size: usize,
    pub explicit_hash_key: Option<String>,
}

impl<'a> PutRecord<'a> {
    /// Data that is not a binary is encoded as JSON.
    pub fn decode(
        key: Term<'a>,
        data: Term<'a>,
        explicit_hash_key: Term<'_>,
        max_record_bytes: usize,
    ) -> Result<Self, Error> {
        let key_bin = Binary::from_term(key)
            .map_err(|_| Error::InvalidPartitionKey("must be a binary".into()))?;
        let key = validate::partition_key(key_bin.as_slice())?;
        let data = match data.get_type() {
            TermType::Binary => Cow::Borrowed(
                Binary::from_term(data)
                    .map_err(|_| Error::InvalidData("a bitstring is not a binary".into()))?
                    .as_slice(),
            ),
            _ => Cow::Owned(json::encode(data).map_err(Error::InvalidData)?),
        };
        let size = validate::record_size(key, &data, max_record_bytes)?;
        let explicit_hash_key = decode_explicit_hash_key(explicit_hash_key)?;
        Ok(PutRecord {
            key,
            data,
            size,
            explicit_hash_key,
        })
    }
}

fn decode_explicit_hash_key(term: Term) -> Result<Option<String>, Error> {
    // An identity check against the atom, not a string comparison: this
    // runs on every put.
    if term == atoms::nil().to_term(term.get_env()) {
        return Ok(None);
    }
    let bin = Binary::from_term(term)
        .map_err(|_| Error::InvalidExplicitHashKey("must be a decimal string".into()))?;
    validate::explicit_hash_key(bin.as_slice()).map(|s| Some(s.to_owned()))
}

/// Checks a record as `put` would and answers `{:ok, data}` with the data
/// as it would be sent, or `{:error, reason}`. On a dirty scheduler: JSON
/// encoding of a large term can outlast a scheduler slice.
#[rustler::nif(schedule = "DirtyCpu")]
fn put_record_check<'a>(
    env: Env<'a>,
    key: Term<'a>,
    data: Term<'a>,
    explicit_hash_key: Term<'a>,
    max_record_bytes: usize,
) -> Term<'a> {
    match PutRecord::decode(key, data, explicit_hash_key, max_record_bytes) {
        Ok(record) => {
            let mut bin = rustler::NewBinary::new(env, record.data.len());
            bin.as_mut_slice().copy_from_slice(&record.data);
            (atoms::ok(), Binary::from(bin)).encode(env)
        }
        Err(error) => (atoms::error(), crate::error::Reason(&error)).encode(env),
    }
}
