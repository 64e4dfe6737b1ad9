//! Dead letters on an object store: `<prefix>/<reason>/<sanitised key>-<crc32>.<ext>` (the
//! payload, when there is one) and `<...>.json` (key, reason, position, message, format).

use std::sync::Arc;

use bytes::Bytes;
use object_store::{path::Path, ObjectStore, PutPayload};

use crate::source::RejectedRecord;

/// Writes rejected records under one prefix of a store.
#[derive(Clone)]
pub struct StoreDeadLetter {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

/// Keep `[A-Za-z0-9._-]`, map the rest to `_`, cap the length: object names stay portable.
pub fn sanitise_key(key: &str) -> String {
    let s: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

impl StoreDeadLetter {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        StoreDeadLetter { store, prefix }
    }

    /// The object path stem (without extension) used for `r`.
    pub fn stem(&self, r: &RejectedRecord) -> Path {
        let mut h = crc32fast::Hasher::new();
        h.update(r.key.as_bytes());
        if let Some(p) = &r.payload {
            h.update(p);
        }
        let name = format!("{}-{:08x}", sanitise_key(&r.key), h.finalize());
        self.prefix.child(r.reason.as_str()).child(name)
    }

    /// Write the record's payload (when there is one) and its JSON sidecar.
    pub async fn write(&self, r: &RejectedRecord) -> Result<(), object_store::Error> {
        let stem = self.stem(r);
        if let Some(p) = &r.payload {
            let ext = r
                .format
                .as_deref()
                .map(sanitise_key)
                .unwrap_or_else(|| "bin".into());
            let path = Path::from(format!("{stem}.{ext}"));
            self.store.put(&path, PutPayload::from(p.clone())).await?;
        }
        let side = serde_json::json!({
            "key": r.key,
            "reason": r.reason,
            "position": r.position,
            "message": r.message,
            "format": r.format,
        });
        let path = Path::from(format!("{stem}.json"));
        self.store
            .put(&path, PutPayload::from(Bytes::from(side.to_string())))
            .await?;
        Ok(())
    }
}
