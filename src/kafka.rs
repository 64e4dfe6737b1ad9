//! librdkafka client settings shared by the Kafka source and the Kafka sinks: brokers,
//! pass-through `options` and `options_env` secrets, and the checks on those fields. Both sides
//! build on this, so no sink depends on the source (or the other way round).

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

/// A Kafka client field that is not usable; `field` is its full config path
/// (`source.brokers`, `embeddings.kafka.options_env."sasl.password"`, ...).
#[derive(Debug, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct ClientConfigError {
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Checks that `brokers` names at least one broker; `field` is the brokers field's full path.
pub fn check_brokers(field: &str, brokers: &str) -> Result<(), ClientConfigError> {
    if brokers.trim().is_empty() {
        return Err(ClientConfigError {
            field: field.into(),
            message: "is empty: give host:port[,host:port]".into(),
        });
    }
    Ok(())
}

/// A librdkafka client config: brokers, then `options`, then `options_env` (property =
/// environment variable); a missing variable is an error naming `env_field`.
pub fn client_config(
    brokers: &str,
    options: &BTreeMap<String, String>,
    options_env: &BTreeMap<String, String>,
    env_field: &str,
) -> Result<ClientConfig, ClientConfigError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in options {
        c.set(k, v);
    }
    for (k, var) in options_env {
        let v = std::env::var(var).map_err(|_| ClientConfigError {
            field: format!("{env_field}.\"{k}\""),
            message: format!("environment variable {var} is not set (or not UTF-8): export it"),
        })?;
        c.set(k, v);
    }
    Ok(c)
}
