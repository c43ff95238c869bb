//! The one error type of Convoy's Rust code. The NIF crate encodes it to the
//! `reason` of an Elixir `{:error, reason}`.

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
    /// A conditional write on a shard lease failed: another worker took it,
    /// or it moved on since this worker last wrote it.
    #[error("the lease is no longer held")]
    LeaseLost,
    /// The lease table belongs to KCL 3.x workers (its coordinator-state
    /// table records a migration), whose leader assigns leases.
    #[error("lease table migrated to KCL 3.x ({table}: {version})")]
    Kcl3Table { table: String, version: String },
}

impl Error {
    pub fn aws(code: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Aws {
            code: code.into(),
            message: message.into(),
        }
    }
}
