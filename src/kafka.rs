//! librdkafka client settings shared by the Kafka source, the Kafka sink and dead letters: brokers,
//! pass-through `options` and `options_env` secrets, and the checks on those fields. Both sides
//! build on this, so no sink depends on the source (or the other way round).

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

use crate::validate::FieldError;

/// Checks that `brokers` names at least one broker; `field` is the brokers field's full path.
pub fn check_brokers(field: &str, brokers: &str) -> Result<(), FieldError> {
    if brokers.trim().is_empty() {
        return Err(FieldError {
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
) -> Result<ClientConfig, FieldError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in options {
        c.set(k, v);
    }
    for (k, var) in options_env {
        let v = std::env::var(var).map_err(|_| FieldError {
            field: format!("{env_field}.\"{k}\""),
            message: format!("environment variable {var} is not set (or not UTF-8): export it"),
        })?;
        c.set(k, v);
    }
    Ok(c)
}

/// Checks the brokers and the topic of a producer; `field` is the section's path
/// (`embeddings.kafka`, `pipeline.dead_letter.kafka`).
pub fn check_topic(field: &str, brokers: &str, topic: &str) -> Result<(), FieldError> {
    check_brokers(&format!("{field}.brokers"), brokers)?;
    if topic.trim().is_empty() {
        return Err(FieldError::new(
            format!("{field}.topic"),
            "is empty: name the topic",
        ));
    }
    Ok(())
}

/// A producer's client config: idempotent by default, then the user's settings (which may
/// override it).
pub fn producer_config(
    brokers: &str,
    options: &BTreeMap<String, String>,
    options_env: &BTreeMap<String, String>,
    env_field: &str,
) -> Result<ClientConfig, FieldError> {
    let mut cc = ClientConfig::new();
    cc.set("enable.idempotence", "true");
    let user = client_config(brokers, options, options_env, env_field)?;
    for (k, v) in user.config_map() {
        cc.set(k, v);
    }
    Ok(cc)
}

/// Checks a producer's settings as [`producer_config`] would use them: brokers, topic and the
/// client properties (`options_env` variables set). `field` is the section's path.
pub fn check_producer(
    field: &str,
    brokers: &str,
    topic: &str,
    options: &BTreeMap<String, String>,
    options_env: &BTreeMap<String, String>,
) -> Result<(), FieldError> {
    check_topic(field, brokers, topic)?;
    producer_config(
        brokers,
        options,
        options_env,
        &format!("{field}.options_env"),
    )
    .map(|_| ())
}
