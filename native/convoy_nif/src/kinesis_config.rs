//! Kinesis connection settings as decoded from Elixir, and the SDK client
//! built from them. Secrets are held but never printed: `Debug` redacts them.

use std::fmt;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::config::Credentials;

/// Mirrors `config :convoy, :kinesis` after `Convoy.KinesisConfig` merged the
/// queue's options, the application config and defaults.
#[derive(rustler::NifMap, Clone, Default)]
pub struct KinesisConfig {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub profile: Option<String>,
    /// Limit for one API call, connection included, in milliseconds (the
    /// Elixir option's name and unit).
    pub request_timeout: u64,
}

impl fmt::Debug for KinesisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "**redacted**");
        f.debug_struct("KinesisConfig")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &redact(&self.access_key_id))
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("profile", &self.profile)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl KinesisConfig {
    /// Resolves the settings (static keys, else profile, else the AWS default
    /// chain) into a client. The SDK's own retries are off: the producer and
    /// poller apply Convoy's retry policy, so there is one mechanism to reason
    /// about and one set of counters.
    pub async fn build_client(&self) -> aws_sdk_kinesis::Client {
        let shared = self.load_shared().await;
        let mut builder = aws_sdk_kinesis::config::Builder::from(&shared)
            .retry_config(RetryConfig::disabled())
            .timeout_config(self.timeouts());
        if let Some(endpoint) = &self.endpoint_url {
            builder = builder.endpoint_url(endpoint);
        }
        aws_sdk_kinesis::Client::from_conf(builder.build())
    }

    /// The same settings for DynamoDB (the lease table), with the same
    /// policy: no SDK retries, Convoy's coordinator backs off itself.
    pub async fn build_dynamodb_client(&self) -> aws_sdk_dynamodb::Client {
        let shared = self.load_shared().await;
        let mut builder = aws_sdk_dynamodb::config::Builder::from(&shared)
            .retry_config(RetryConfig::disabled())
            .timeout_config(self.timeouts());
        if let Some(endpoint) = &self.endpoint_url {
            builder = builder.endpoint_url(endpoint);
        }
        aws_sdk_dynamodb::Client::from_conf(builder.build())
    }

    async fn load_shared(&self) -> aws_config::SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(profile) = &self.profile {
            loader = loader.profile_name(profile);
        }
        if let (Some(key), Some(secret)) = (&self.access_key_id, &self.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                key.clone(),
                secret.clone(),
                self.session_token.clone(),
                None,
                "convoy-config",
            ));
        }
        loader.load().await
    }

    fn timeouts(&self) -> TimeoutConfig {
        let timeout = Duration::from_millis(self.request_timeout.max(1));
        TimeoutConfig::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .operation_attempt_timeout(timeout)
            .operation_timeout(timeout)
            .build()
    }
}
