//! The one error type of the crate. It encodes to the `reason` of an Elixir
//! `{:error, reason}`, so NIFs and task replies share one vocabulary.

use rustler::{Encoder, Env, Term};

use crate::atoms;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("the queue's buffer is full")]
    Overloaded,
    #[error("the queue is closed")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("the queue shut down before the record was sent")]
    Shutdown,
    #[error("invalid partition key: {0}")]
    InvalidPartitionKey(String),
    #[error("invalid explicit hash key: {0}")]
    InvalidExplicitHashKey(String),
    #[error("data cannot be encoded as JSON: {0}")]
    InvalidData(String),
    #[error("record of {size} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge { size: usize, max: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error answered by Kinesis or met on the way there: `code` is the
    /// AWS error code (`ProvisionedThroughputExceededException`, ...) or a
    /// transport class (`DispatchFailure`, `TimeoutError`).
    #[error("{code}: {message}")]
    Aws { code: String, message: String },
    #[error("task panicked: {0}")]
    Panic(String),
}

impl Error {
    pub fn aws(code: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Aws {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl Encoder for Error {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        match self {
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
        }
    }
}

/// `{:error, reason}` for a result whose success value is already a term.
pub fn encode_result<'a, T: Encoder>(env: Env<'a>, result: Result<T, Error>) -> Term<'a> {
    match result {
        Ok(value) => (atoms::ok(), value).encode(env),
        Err(e) => (atoms::error(), e).encode(env),
    }
}
