//! Retry policy shared by the batcher and the pollers: exponential backoff
//! with jitter, bounded by a count and a deadline, and the rule for which
//! Kinesis failures are worth another attempt.

use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use rand::Rng;

use crate::error::Error;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base: Duration,
    pub max_backoff: Duration,
    /// Give up on a record this long after its first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 10,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `attempt` (1-based): half of the exponential
    /// step is fixed, half random ("equal jitter"), so concurrent retries spread
    /// out yet never hammer a struggling endpoint with near-zero delays.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        let step = exp.min(self.max_backoff);
        let half = step / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }

    /// Whether another attempt is allowed after `attempts` tries that began at `started`.
    pub fn allows(&self, attempts: u32, started: Instant) -> bool {
        attempts <= self.max_retries && started.elapsed() < self.deadline
    }
}

/// Error codes for which a later attempt can succeed. `ResourceNotFound` is
/// among them: a stream being (re)created, or an emulator restarting, answers
/// it for a moment.
pub fn is_retryable_code(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "LimitExceededException"
            | "ThrottlingException"
            | "InternalFailure"
            | "InternalFailureException"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "ResourceNotFoundException"
            | "ResourceInUseException"
            | "KMSThrottlingException"
            | "DispatchFailure"
            | "TimeoutError"
            | "ResponseError"
            | "HttpServerError"
    )
}

pub fn is_throttling_code(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "LimitExceededException"
            | "ThrottlingException"
            | "KMSThrottlingException"
    )
}

/// Turns an SDK error into Convoy's error, naming transport failures by class
/// so they can be classified like service error codes.
pub fn classify<E>(err: &SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown");
            let status = service.raw().status().as_u16();
            let code = if code == "Unknown" && status >= 500 {
                "HttpServerError"
            } else {
                code
            };
            Error::aws(code, e.message().unwrap_or_default())
        }
        SdkError::DispatchFailure(d) => {
            Error::aws("DispatchFailure", format!("{:?}", d.as_connector_error()))
        }
        SdkError::TimeoutError(_) => Error::aws("TimeoutError", "request timed out"),
        SdkError::ResponseError(_) => {
            Error::aws("ResponseError", "malformed or interrupted response")
        }
        SdkError::ConstructionFailure(_) => Error::aws("ConstructionFailure", format!("{err}")),
        _ => Error::aws("Unknown", format!("{err}")),
    }
}

pub fn error_is_retryable(error: &Error) -> bool {
    match error {
        Error::Aws { code, .. } => is_retryable_code(code),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        let policy = RetryPolicy::default();
        for attempt in 1..40 {
            let d = policy.backoff(attempt);
            let step = policy
                .base
                .saturating_mul(1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX))
                .min(policy.max_backoff);
            assert!(
                d >= step / 2 && d <= step,
                "attempt {attempt}: {d:?} vs {step:?}"
            );
        }
        assert!(policy.backoff(40) <= policy.max_backoff);
    }

    #[test]
    fn retry_budget_is_count_and_deadline() {
        let policy = RetryPolicy {
            max_retries: 2,
            deadline: Duration::from_secs(60),
            ..Default::default()
        };
        let now = Instant::now();
        assert!(policy.allows(1, now));
        assert!(policy.allows(2, now));
        assert!(!policy.allows(3, now));
        let expired = RetryPolicy {
            deadline: Duration::ZERO,
            ..policy
        };
        assert!(!expired.allows(0, now));
    }

    #[test]
    fn throttling_and_transport_failures_retry_validation_does_not() {
        assert!(is_retryable_code("ProvisionedThroughputExceededException"));
        assert!(is_retryable_code("InternalFailure"));
        assert!(is_retryable_code("DispatchFailure"));
        assert!(!is_retryable_code("ValidationException"));
        assert!(!is_retryable_code("AccessDeniedException"));
    }
}
