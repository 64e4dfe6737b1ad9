//! Object-store URLs and options, shared by every component that reads or writes a store
//! (sources, checkpoints, Parquet sink, dead letters, eval, shards).
//!
//! A config may name a plain local path; [`local_path_to_url`] turns it into a `file://` URL
//! once, at load time, so the components below see URLs only. Secrets stay in the
//! environment ([`default_store_options`]); a config's `options` table overrides them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// A store URL or path that cannot be used. The text is the cause only: each component wraps
/// it in its own error, which names the setting and the URLs it accepts.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{message}")]
    BadUrl { url: String, message: String },
    #[error("{message}")]
    BadPath { field: String, message: String },
}

/// A URL stays as it is; a plain path (no `scheme://`) becomes a `file://` URL, relative
/// paths resolved against the working directory. `field` names the setting in errors.
pub fn local_path_to_url(s: &str, field: &str) -> Result<String, StoreError> {
    if s.contains("://") {
        return Ok(s.to_string());
    }
    let bad = |message: String| StoreError::BadPath {
        field: field.to_string(),
        message,
    };
    let p = Path::new(s);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| bad(format!("cannot resolve the relative path `{s}`: {e}")))?
            .join(p)
    };
    let mut url = url::Url::from_file_path(&abs)
        .map_err(|_| bad(format!("`{s}` is not a usable local path")))?
        .to_string();
    if s.ends_with('/') && !url.ends_with('/') {
        url.push('/');
    }
    Ok(url)
}

/// object_store options from the environment: `AWS_*`, `GOOGLE_*`, `AZURE_*` variables,
/// lower-cased as object_store's builders expect (what `from_env` would read).
pub fn default_store_options() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_")
        })
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

/// Open the store named by `url` (the scheme picks the backend) with environment options
/// overridden by `options`; returns the store and the path of the URL inside it.
pub fn open_store(
    url: &str,
    options: &BTreeMap<String, String>,
) -> Result<(Arc<dyn object_store::ObjectStore>, object_store::path::Path), StoreError> {
    let bad = |message: String| StoreError::BadUrl {
        url: url.to_string(),
        message,
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let mut opts = default_store_options();
    opts.extend(options.iter().map(|(k, v)| (k.clone(), v.clone())));
    let (scheme, path) =
        object_store::ObjectStoreScheme::parse(&parsed).map_err(|e| bad(e.to_string()))?;
    // The cloud clients with odcd's retry budget ([`client_retry`]); the rest as object_store
    // builds them from the URL.
    macro_rules! cloud {
        ($builder:ty) => {{
            let b =
                opts.iter().fold(
                    <$builder>::new().with_url(url.to_string()),
                    |b, (k, v)| match k.parse() {
                        Ok(k) => b.with_config(k, v.clone()),
                        Err(_) => b,
                    },
                );
            let store: Arc<dyn object_store::ObjectStore> = Arc::new(
                b.with_retry(client_retry())
                    .build()
                    .map_err(|e| bad(e.to_string()))?,
            );
            store
        }};
    }
    let store = match scheme {
        object_store::ObjectStoreScheme::AmazonS3 => cloud!(object_store::aws::AmazonS3Builder),
        object_store::ObjectStoreScheme::GoogleCloudStorage => {
            cloud!(object_store::gcp::GoogleCloudStorageBuilder)
        }
        object_store::ObjectStoreScheme::MicrosoftAzure => {
            cloud!(object_store::azure::MicrosoftAzureBuilder)
        }
        _ => {
            let (store, _) =
                object_store::parse_url_opts(&parsed, opts).map_err(|e| bad(e.to_string()))?;
            Arc::from(store)
        }
    };
    let path = object_store::path::Path::parse(path.as_ref()).map_err(|e| bad(e.to_string()))?;
    Ok((store, path))
}

/// The cloud clients' own retries of one request (connection errors, 5xx, 429): at most
/// ~10 s, pauses of 100 ms doubling to 2 s. object_store's default (10 retries within
/// 3 minutes, pauses to 15 s) would hide an outage of the store inside one call for minutes;
/// with this bound the failure reaches odcd's own retry layers within seconds, and they count
/// it, say it in `/readyz` and keep retrying (the source waits for its store, the sinks retry
/// their writes, a failed checkpoint is tried again at the next one).
pub fn client_retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: std::time::Duration::from_secs(10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_become_file_urls_and_urls_stay() {
        assert_eq!(
            local_path_to_url("s3://b/p/", "x").ok().as_deref(),
            Some("s3://b/p/")
        );
        let u = local_path_to_url("/tmp/odcd shards/", "x").unwrap_or_default();
        assert_eq!(u, "file:///tmp/odcd%20shards/");
        let rel = local_path_to_url("data/shards", "x").unwrap_or_default();
        assert!(
            rel.starts_with("file:///") && rel.ends_with("/data/shards"),
            "{rel}"
        );
    }

    #[test]
    fn an_unknown_scheme_is_refused() {
        let e = open_store("s4://nowhere/x", &BTreeMap::new())
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some(), "an unknown scheme is refused");
    }
}
