//! Encoding of `convoy_core::error::Error` as the `reason` of an Elixir
//! `{:error, reason}`, so NIFs and task replies share one vocabulary.

use rustler::{Encoder, Env, Term};

pub use convoy_core::error::Error;

use crate::atoms;

/// Newtype so the foreign error type can implement rustler's `Encoder`.
pub struct Reason<'e>(pub &'e Error);

impl Encoder for Reason<'_> {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match self.0 {
            Error::Overloaded => atoms::overloaded().encode(env),
            Error::Closed => atoms::closed().encode(env),
            Error::Timeout => atoms::timeout().encode(env),
            Error::Shutdown => atoms::shutdown().encode(env),
            Error::InvalidPartitionKey(d) => (atoms::invalid_partition_key(), d).encode(env),
            Error::InvalidExplicitHashKey(d) => (atoms::invalid_explicit_hash_key(), d).encode(env),
            Error::InvalidData(d) => (atoms::invalid_data(), d).encode(env),
            Error::RecordTooLarge { size, max } => {
                (atoms::record_too_large(), *size as u64, *max as u64).encode(env)
            }
            Error::InvalidArgument(d) => (atoms::invalid_argument(), d).encode(env),
            Error::Aws { code, message } => (atoms::aws(), code, message).encode(env),
            Error::Panic(d) => (atoms::panic(), d).encode(env),
            Error::LeaseLost => atoms::lease_lost().encode(env),
            Error::Kcl3Table { table, version } => {
                (atoms::kcl3_table(), table, version).encode(env)
            }
        }
    }
}

/// `{:error, reason}` for a result whose success value is already a term.
pub fn encode_result<'a, T: Encoder>(env: Env<'a>, result: Result<T, Error>) -> Term<'a> {
    match result {
        Ok(value) => (atoms::ok(), value).encode(env),
        Err(e) => (atoms::error(), Reason(&e)).encode(env),
    }
}
