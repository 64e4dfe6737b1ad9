//! Releases on an object store: reading and writing a release's objects, listing releases,
//! the `CURRENT` pointer's atomic replacement, retention.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::de::DeserializeOwned;

use super::layout::{
    PartRecord, Pointer, ReleaseManifest, ReleaseSpec, CENTRING, CURRENT, DONE, MANIFEST, MODEL,
    PARTS, ROLLED_BACK, SPEC,
};
use super::ReleaseError;
use crate::infer::Centroids;

/// One release as found on the store.
#[derive(Debug, Clone)]
pub struct ReleaseInfo {
    pub id: String,
    pub spec: ReleaseSpec,
    /// Present once the release is complete.
    pub manifest: Option<ReleaseManifest>,
    pub rolled_back: bool,
}

impl ReleaseInfo {
    pub fn complete(&self) -> bool {
        self.manifest.is_some()
    }

    /// Still to be built: incomplete, not rolled back, and created since `CURRENT` (named by
    /// `pointer`) last moved or for a newer step. An incomplete release older than both was
    /// abandoned when another one became current.
    pub fn building(&self, pointer: Option<&Pointer>) -> bool {
        !self.complete()
            && !self.rolled_back
            && pointer.is_none_or(|p| {
                self.spec.created_unix_secs >= p.updated_unix_secs || self.id > p.release
            })
    }

    /// Complete, not rolled back, and completed after `CURRENT` last moved: a process
    /// stopped between its manifest and the pointer, so its switch is owed. One completed
    /// earlier was current once, or was passed over on purpose.
    pub fn owed_switch(&self, pointer: Option<&Pointer>) -> bool {
        !self.rolled_back
            && self.manifest.as_ref().is_some_and(|m| {
                pointer.is_none_or(|p| {
                    p.release != self.id && m.completed_unix_secs > p.updated_unix_secs
                })
            })
    }
}

/// The version of `CURRENT` that was read: a replacement is conditional on it.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentVersion(Option<UpdateVersion>);

/// The releases under one object-store prefix.
#[derive(Clone)]
pub struct ReleaseStore {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

impl ReleaseStore {
    /// Opens the store at `url` (a plain local path is accepted too).
    pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Self, ReleaseError> {
        let bad = |e: &dyn std::fmt::Display| ReleaseError::BadUrl {
            url: url.to_string(),
            message: e.to_string(),
        };
        let url = crate::store::local_path_to_url(url, "releases.url").map_err(|e| bad(&e))?;
        let (store, prefix) = crate::store::open_store(&url, options).map_err(|e| bad(&e))?;
        Ok(Self::with_store(&url, store, prefix))
    }

    /// The releases on an already opened `store` under `prefix` (tests wrap a real store).
    pub fn with_store(url: &str, store: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        ReleaseStore {
            url: url.to_string(),
            store,
            prefix,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying store and the path of `rel` (relative to the releases URL) in it.
    pub fn object(&self, rel: &str) -> (Arc<dyn ObjectStore>, Path) {
        (self.store.clone(), self.path(rel))
    }

    fn path(&self, rel: &str) -> Path {
        let mut p = self.prefix.clone();
        for seg in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.child(seg);
        }
        p
    }

    fn store_err(&self, path: &Path, e: impl std::fmt::Display) -> ReleaseError {
        ReleaseError::Store {
            url: self.url.clone(),
            path: path.to_string(),
            message: e.to_string(),
        }
    }

    async fn get(&self, rel: &str) -> Result<Option<(Bytes, Option<UpdateVersion>)>, ReleaseError> {
        let path = self.path(rel);
        match self.store.get(&path).await {
            Ok(r) => {
                let version = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let bytes = r.bytes().await.map_err(|e| self.store_err(&path, e))?;
                Ok(Some((bytes, Some(version))))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err(&path, e)),
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, rel: &str) -> Result<Option<T>, ReleaseError> {
        let Some((bytes, _)) = self.get(rel).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ReleaseError::BadObject {
                url: self.url.clone(),
                path: self.path(rel).to_string(),
                message: e.to_string(),
            })
    }

    async fn put(&self, rel: &str, bytes: impl Into<PutPayload>) -> Result<(), ReleaseError> {
        let path = self.path(rel);
        self.store
            .put(&path, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| self.store_err(&path, e))
    }

    async fn put_json(&self, rel: &str, v: &impl serde::Serialize) -> Result<(), ReleaseError> {
        let bytes = serde_json::to_vec_pretty(v).map_err(|e| ReleaseError::BadObject {
            url: self.url.clone(),
            path: self.path(rel).to_string(),
            message: format!("cannot encode: {e}"),
        })?;
        self.put(rel, bytes).await
    }

    /// The `CURRENT` pointer and the version read (for a conditional replacement).
    pub async fn current(&self) -> Result<(Option<Pointer>, CurrentVersion), ReleaseError> {
        let Some((bytes, version)) = self.get(CURRENT).await? else {
            return Ok((None, CurrentVersion(None)));
        };
        let p = serde_json::from_slice(&bytes).map_err(|e| ReleaseError::BadObject {
            url: self.url.clone(),
            path: self.path(CURRENT).to_string(),
            message: e.to_string(),
        })?;
        Ok((Some(p), CurrentVersion(version)))
    }

    /// Replaces `CURRENT` with `new`, only if it is still the version `read` (created only if
    /// there was none). Where the store has no conditional write (a local directory), the
    /// write is a plain atomic replacement. [`ReleaseError::CurrentMoved`] when another
    /// process replaced it meanwhile.
    pub async fn set_current(
        &self,
        new: &Pointer,
        read: &CurrentVersion,
    ) -> Result<(), ReleaseError> {
        let path = self.path(CURRENT);
        let bytes = serde_json::to_vec_pretty(new).map_err(|e| ReleaseError::BadObject {
            url: self.url.clone(),
            path: path.to_string(),
            message: format!("cannot encode: {e}"),
        })?;
        let mode = match &read.0 {
            None => PutMode::Create,
            Some(v) => PutMode::Update(v.clone()),
        };
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self.store.put_opts(&path, bytes.clone().into(), opts).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotImplemented) => {
                // No compare-and-swap on this store: an atomic whole-object replacement
                // (rename on a local disk) still never shows a partial pointer.
                self.put(CURRENT, bytes).await
            }
            Err(
                e @ (object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. }),
            ) => Err(ReleaseError::CurrentMoved {
                url: self.url.clone(),
                message: e.to_string(),
            }),
            Err(e) => Err(self.store_err(&path, e)),
        }
    }

    pub async fn spec(&self, id: &str) -> Result<Option<ReleaseSpec>, ReleaseError> {
        self.get_json(&format!("{id}/{SPEC}")).await
    }

    pub async fn manifest(&self, id: &str) -> Result<Option<ReleaseManifest>, ReleaseError> {
        self.get_json(&format!("{id}/{MANIFEST}")).await
    }

    pub async fn write_spec(&self, spec: &ReleaseSpec) -> Result<(), ReleaseError> {
        self.put_json(&format!("{}/{SPEC}", spec.release), spec)
            .await
    }

    pub async fn write_manifest(&self, m: &ReleaseManifest) -> Result<(), ReleaseError> {
        self.put_json(&format!("{}/{MANIFEST}", m.spec.release), m)
            .await
    }

    pub async fn write_model(&self, id: &str, weights: Vec<u8>) -> Result<(), ReleaseError> {
        self.put(&format!("{id}/{MODEL}"), weights).await
    }

    pub async fn read_model(&self, id: &str) -> Result<Bytes, ReleaseError> {
        let rel = format!("{id}/{MODEL}");
        self.get(&rel)
            .await?
            .map(|(b, _)| b)
            .ok_or_else(|| self.missing(&rel))
    }

    fn missing(&self, rel: &str) -> ReleaseError {
        ReleaseError::BadObject {
            url: self.url.clone(),
            path: self.path(rel).to_string(),
            message: "missing: the release folder is incomplete (delete it, or promote again)"
                .into(),
        }
    }

    /// Writes the centring mean (D) and the checkpoint's centroids (K × D_neck), if any.
    pub async fn write_centring(
        &self,
        id: &str,
        mean: &[f32],
        centroids: Option<&Centroids>,
    ) -> Result<(), ReleaseError> {
        let rel = format!("{id}/{CENTRING}");
        let enc = |e: &dyn std::fmt::Display| ReleaseError::BadObject {
            url: self.url.clone(),
            path: self.path(&rel).to_string(),
            message: format!("cannot encode: {e}"),
        };
        let dev = candle_core::Device::Cpu;
        let mut tensors = vec![(
            "mean",
            candle_core::Tensor::from_slice(mean, mean.len(), &dev).map_err(|e| enc(&e))?,
        )];
        if let Some(c) = centroids {
            tensors.push((
                "centroids",
                candle_core::Tensor::from_slice(&c.values, (c.k, c.dim), &dev)
                    .map_err(|e| enc(&e))?,
            ));
        }
        let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (*k, v)), None)
            .map_err(|e| enc(&e))?;
        self.put(&rel, bytes).await
    }

    /// The centring mean and the centroids (if the release has them).
    pub async fn read_centring(
        &self,
        id: &str,
    ) -> Result<(Vec<f32>, Option<Centroids>), ReleaseError> {
        let rel = format!("{id}/{CENTRING}");
        let (bytes, _) = self.get(&rel).await?.ok_or_else(|| self.missing(&rel))?;
        let bad = |e: &dyn std::fmt::Display| ReleaseError::BadObject {
            url: self.url.clone(),
            path: self.path(&rel).to_string(),
            message: e.to_string(),
        };
        let map = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
            .map_err(|e| bad(&e))?;
        let mean = map
            .get("mean")
            .ok_or_else(|| bad(&"no tensor `mean`"))?
            .to_vec1::<f32>()
            .map_err(|e| bad(&e))?;
        let centroids = match map.get("centroids") {
            Some(t) => {
                let (k, dim) = t.dims2().map_err(|e| bad(&e))?;
                let values = t
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| bad(&e))?;
                Some(Centroids { k, dim, values })
            }
            None => None,
        };
        Ok((mean, centroids))
    }

    /// Where the Parquet part of a shard goes.
    pub fn part_path(&self, id: &str, part: &str) -> (String, Path) {
        let rel = format!("{PARTS}/{part}.parquet");
        let path = self.path(&format!("{id}/{rel}"));
        (rel, path)
    }

    /// Records that a shard is embedded (after its part is published).
    pub async fn write_done(
        &self,
        id: &str,
        part: &str,
        r: &PartRecord,
    ) -> Result<(), ReleaseError> {
        self.put_json(&format!("{id}/{DONE}/{part}.json"), r).await
    }

    /// The embedded shards of release `id`, by shard.
    pub async fn done_parts(&self, id: &str) -> Result<BTreeMap<String, PartRecord>, ReleaseError> {
        let dir = self.path(&format!("{id}/{DONE}"));
        let metas: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.store_err(&dir, e))?;
        let mut out = BTreeMap::new();
        for m in metas {
            let Some(name) = m.location.filename() else {
                continue;
            };
            let Some(part) = name.strip_suffix(".json") else {
                continue;
            };
            match self
                .get_json::<PartRecord>(&format!("{id}/{DONE}/{part}.json"))
                .await
            {
                Ok(Some(r)) => {
                    out.insert(r.shard.clone(), r);
                }
                Ok(None) => {}
                // A record that does not parse marks nothing: the shard is embedded again.
                Err(ReleaseError::BadObject { path, message, .. }) => {
                    tracing::warn!(%path, "unreadable release part record, its shard will be embedded again: {message}");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Every release (a folder with a spec), sorted by id (= by step).
    pub async fn list(&self) -> Result<Vec<ReleaseInfo>, ReleaseError> {
        let listed = self
            .store
            .list_with_delimiter((!self.prefix.as_ref().is_empty()).then_some(&self.prefix))
            .await
            .map_err(|e| self.store_err(&self.prefix, e))?;
        let mut out = Vec::new();
        for dir in listed.common_prefixes {
            let Some(id) = dir.filename().map(str::to_string) else {
                continue;
            };
            let Some(spec) = self.spec(&id).await? else {
                continue; // debris of a creation that did not finish
            };
            let manifest = self.manifest(&id).await?;
            let rolled_back = self.get(&format!("{id}/{ROLLED_BACK}")).await?.is_some();
            out.push(ReleaseInfo {
                id,
                spec,
                manifest,
                rolled_back,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Marks `id` as rolled back: it is never made current again automatically.
    pub async fn mark_rolled_back(&self, id: &str) -> Result<(), ReleaseError> {
        self.put(
            &format!("{id}/{ROLLED_BACK}"),
            Bytes::from_static(b"rolled back by an operator\n"),
        )
        .await
    }

    /// Deletes release `id`: its manifest and spec first (it stops being a release), then
    /// the rest of its folder.
    pub async fn delete(&self, id: &str) -> Result<(), ReleaseError> {
        for rel in [format!("{id}/{MANIFEST}"), format!("{id}/{SPEC}")] {
            let p = self.path(&rel);
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.store_err(&p, e)),
            }
        }
        let dir = self.path(id);
        let objects: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.store_err(&dir, e))?;
        for o in objects {
            match self.store.delete(&o.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.store_err(&o.location, e)),
            }
        }
        Ok(())
    }

    /// Retention: keeps the `keep` newest complete releases, the current one and any release
    /// newer than it still being built; deletes the other complete ones and the incomplete
    /// ones older than the current release (abandoned builds). Returns the ids deleted.
    pub async fn prune(&self, keep: usize) -> Result<Vec<String>, ReleaseError> {
        let (pointer, _) = self.current().await?;
        let current = pointer.as_ref().map(|p| p.release.clone());
        let all = self.list().await?;
        let complete: Vec<&ReleaseInfo> = all.iter().filter(|r| r.complete()).collect();
        let cut = complete.len().saturating_sub(keep);
        let mut doomed: Vec<&str> = complete[..cut]
            .iter()
            .map(|r| r.id.as_str())
            .filter(|id| Some(*id) != current.as_deref())
            .collect();
        if pointer.is_some() {
            doomed.extend(
                all.iter()
                    .filter(|r| !r.complete() && !r.building(pointer.as_ref()))
                    .map(|r| r.id.as_str()),
            );
        }
        let mut deleted = Vec::new();
        for id in doomed {
            self.delete(id).await?;
            deleted.push(id.to_string());
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::layout::{release_id, FORMAT_VERSION};
    use object_store::memory::InMemory;

    fn mem() -> ReleaseStore {
        ReleaseStore::with_store("memory:///r/", Arc::new(InMemory::new()), Path::from("r"))
    }

    fn pointer(id: &str) -> Pointer {
        Pointer {
            format_version: FORMAT_VERSION,
            release: id.into(),
            prefix: format!("{id}/"),
            manifest: format!("{id}/manifest.json"),
            step: 1,
            feature: crate::model::FeatureKind::Neck,
            dim: 4,
            rows: 10,
            previous: None,
            updated_unix_secs: 0,
        }
    }

    #[tokio::test]
    async fn current_is_replaced_only_from_the_version_read() {
        let s = mem();
        let (none, v0) = s.current().await.unwrap();
        assert!(none.is_none());
        s.set_current(&pointer("a"), &v0).await.unwrap();
        // A second writer that read "no pointer" loses.
        assert!(matches!(
            s.set_current(&pointer("b"), &v0).await,
            Err(ReleaseError::CurrentMoved { .. })
        ));
        let (p, v1) = s.current().await.unwrap();
        assert_eq!(p.unwrap().release, "a");
        s.set_current(&pointer("c"), &v1).await.unwrap();
        // ... and so does one that read the old version.
        assert!(matches!(
            s.set_current(&pointer("d"), &v1).await,
            Err(ReleaseError::CurrentMoved { .. })
        ));
        assert_eq!(s.current().await.unwrap().0.unwrap().release, "c");
    }

    #[tokio::test]
    async fn centring_round_trips_and_debris_is_not_a_release() {
        let s = mem();
        let c = Centroids {
            k: 2,
            dim: 3,
            values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let id = release_id(5, crate::model::FeatureKind::Stage(2));
        s.write_centring(&id, &[0.5, -0.5], Some(&c)).await.unwrap();
        let (mean, back) = s.read_centring(&id).await.unwrap();
        assert_eq!(mean, vec![0.5, -0.5]);
        assert_eq!(back, Some(c));
        // Model and centring but no spec yet: a crash during creation, not a release.
        s.write_model(&id, vec![1, 2, 3]).await.unwrap();
        assert!(s.list().await.unwrap().is_empty());
    }
}
