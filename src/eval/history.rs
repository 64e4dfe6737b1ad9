//! Training history kept in checkpoints for the report's plots over steps: one point every
//! `train.log_every` steps (loss, change ratio, empty / small clusters, the latest in-daemon
//! k-NN top-1). Stored under the `history` key of the checkpoint's `extra` JSON, so
//! checkpoints written before it existed load with an empty history. Bounded: when full,
//! every other point is dropped, so the history always spans the whole run at a coarser
//! resolution.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Points kept at most (about 100 kB of JSON).
pub const MAX_POINTS: usize = 1024;

/// Key of the history inside a checkpoint's `extra`.
pub const EXTRA_KEY: &str = "history";

/// One sample of the training curves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// Steps done when the point was taken.
    pub step: u64,
    pub loss: f32,
    pub change_ratio: f64,
    pub empty_clusters: usize,
    pub small_clusters: usize,
    pub min_cluster: usize,
    pub max_cluster: usize,
    /// Latest in-daemon k-NN top-1 by k (as a string key, for JSON), if an evaluation ran.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub knn_top1: BTreeMap<String, f64>,
    /// Step of the weights that `knn_top1` was measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knn_step: Option<u64>,
}

impl HistoryPoint {
    /// The point after a training step: its loss and change ratio, the memory's cluster
    /// health, and the latest in-daemon evaluation if there is one.
    pub fn new(
        out: &crate::train::StepOutput,
        stats: &crate::odc::MemoryStats,
        eval: Option<super::daemon::LatestEval>,
    ) -> HistoryPoint {
        HistoryPoint {
            step: out.step + 1,
            loss: out.loss,
            change_ratio: out.change_ratio,
            empty_clusters: stats.empty_clusters,
            small_clusters: stats.small_clusters,
            min_cluster: stats.min_size,
            max_cluster: stats.max_size,
            knn_top1: eval
                .as_ref()
                .map(|e| e.knn.iter().map(|k| (k.k.to_string(), k.top1)).collect())
                .unwrap_or_default(),
            knn_step: eval.map(|e| e.step),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub points: Vec<HistoryPoint>,
    /// k-NN top-1 without training, by baseline (`untrained`, `raw_pixels`) then k, as the
    /// in-daemon evaluation measured them once: the lines the curve must stay above.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub baselines: BTreeMap<String, BTreeMap<String, f64>>,
}

impl History {
    /// Keeps the evaluation's baselines (k as a string key, for JSON).
    pub fn set_baselines(&mut self, baselines: &BTreeMap<String, Vec<super::knn::KnnResult>>) {
        for (name, knn) in baselines {
            self.baselines.insert(
                name.clone(),
                knn.iter().map(|k| (k.k.to_string(), k.top1)).collect(),
            );
        }
    }

    /// The history stored in a checkpoint's `extra` (empty when absent or unreadable: an
    /// older checkpoint, or one not written by `odcd run`).
    pub fn from_extra(extra: &serde_json::Value) -> History {
        match extra.get(EXTRA_KEY) {
            None | Some(serde_json::Value::Null) => History::default(),
            Some(v) => serde_json::from_value(v.clone()).unwrap_or_else(|e| {
                tracing::warn!(
                    "the checkpoint's training history is unreadable ({e}); starting a new one"
                );
                History::default()
            }),
        }
    }

    /// `extra` with this history set (other keys kept).
    pub fn into_extra(&self, extra: &serde_json::Value) -> serde_json::Value {
        let mut map = match extra {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        map.insert(
            EXTRA_KEY.to_string(),
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
        );
        serde_json::Value::Object(map)
    }

    /// Appends a point; thins the history to every other point when it is full. A point at
    /// or before the last one's step (a resumed run re-doing steps) replaces the tail.
    pub fn push(&mut self, p: HistoryPoint) {
        while self.points.last().is_some_and(|l| l.step >= p.step) {
            self.points.pop();
        }
        if self.points.len() >= MAX_POINTS {
            let kept: Vec<HistoryPoint> = self
                .points
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == 0)
                .map(|(_, p)| p.clone())
                .collect();
            self.points = kept;
        }
        self.points.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64) -> HistoryPoint {
        HistoryPoint {
            step,
            loss: 1.0,
            change_ratio: 0.1,
            empty_clusters: 0,
            small_clusters: 1,
            min_cluster: 2,
            max_cluster: 3,
            knn_top1: BTreeMap::new(),
            knn_step: None,
        }
    }

    #[test]
    fn missing_history_is_empty() {
        assert!(History::from_extra(&serde_json::Value::Null)
            .points
            .is_empty());
        assert!(History::from_extra(&serde_json::json!({"other": 1}))
            .points
            .is_empty());
    }

    #[test]
    fn round_trips_through_extra_keeping_other_keys() {
        let mut h = History::default();
        h.push(point(10));
        let mut p = point(20);
        p.knn_top1.insert("20".into(), 0.8);
        p.knn_step = Some(15);
        h.push(p);
        let extra = h.into_extra(&serde_json::json!({"other": 1}));
        assert_eq!(extra["other"], 1);
        assert_eq!(History::from_extra(&extra), h);
    }

    #[test]
    fn stays_bounded_and_spans_the_run() {
        let mut h = History::default();
        for s in 1..=10 * MAX_POINTS as u64 {
            h.push(point(s));
        }
        assert!(h.points.len() <= MAX_POINTS);
        assert!(h.points.len() > MAX_POINTS / 4);
        assert_eq!(h.points[0].step, 1, "the first point is kept");
        assert_eq!(h.points.last().unwrap().step, 10 * MAX_POINTS as u64);
        assert!(h.points.windows(2).all(|w| w[0].step < w[1].step));
    }

    #[test]
    fn a_resumed_run_replaces_steps_it_redoes() {
        let mut h = History::default();
        for s in [10, 20, 30] {
            h.push(point(s));
        }
        h.push(point(20));
        assert_eq!(
            h.points.iter().map(|p| p.step).collect::<Vec<_>>(),
            vec![10, 20]
        );
    }
}
