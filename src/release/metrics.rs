//! The releases' Prometheus series (README "Metrics").

use prometheus::{
    Counter, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Why a candidate was not promoted: the `reason` label of
/// `odcd_release_decisions_total{decision="rejected"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// A newer candidate replaced it while a release was being built (the newest waits and is
    /// judged once that release is complete).
    Building,
    /// Before `promote.min_steps`.
    TooEarly,
    /// Within `promote.min_interval_secs` of the last promotion.
    Interval,
    /// Effective rank below `promote.min_rank_ratio` of the reference.
    Collapsed,
    /// k-NN not above raw pixels.
    BelowPixels,
    /// k-NN not above the untrained network.
    BelowUntrained,
    /// k-NN not above the current release by `promote.min_knn_gain`.
    NotBetter,
    /// The candidate could not be measured (see the log).
    Failed,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        RejectReason::Building,
        RejectReason::TooEarly,
        RejectReason::Interval,
        RejectReason::Collapsed,
        RejectReason::BelowPixels,
        RejectReason::BelowUntrained,
        RejectReason::NotBetter,
        RejectReason::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Building => "building",
            RejectReason::TooEarly => "too_early",
            RejectReason::Interval => "interval",
            RejectReason::Collapsed => "collapsed",
            RejectReason::BelowPixels => "below_pixels",
            RejectReason::BelowUntrained => "below_untrained",
            RejectReason::NotBetter => "not_better",
            RejectReason::Failed => "failed",
        }
    }
}

/// Series of the release manager and workers.
#[derive(Clone)]
pub struct ReleaseMetrics {
    /// `odcd_release_current_step`: the step of the current release's checkpoint (0: none).
    pub current_step: IntGauge,
    /// `odcd_release_pending`: 1 while a release is being built.
    pub pending: IntGauge,
    /// `odcd_release_decisions_total{decision, reason}`.
    pub decisions: IntCounterVec,
    /// `odcd_release_candidate_step`: the step of the last candidate judged.
    pub candidate_step: IntGauge,
    /// `odcd_release_candidate_score{signal, model}`: `effective_rank` / `knn_top1` of the
    /// `candidate`, the `current` release, the `untrained` network and `raw_pixels`.
    pub scores: GaugeVec,
    /// `odcd_release_backfill_shards{state}`: the pending release's shards `done` / `todo`.
    pub backfill_shards: IntGaugeVec,
    /// `odcd_release_backfill_rows`: rows the pending release holds so far.
    pub backfill_rows: IntGauge,
    /// `odcd_release_rows_total`: rows embedded into releases by this process.
    pub rows: IntCounter,
    /// `odcd_release_fresh_delay_seconds`: a new shard landing → its rows in the current release.
    pub fresh_delay: Histogram,
    /// `odcd_release_busy_seconds_total`: wall time the release work kept its threads busy.
    pub busy_seconds: Counter,
    /// `odcd_release_errors_total`: failed pieces of release work (retried).
    pub errors: IntCounter,
    /// `odcd_release_records_rejected_total`: records a release could not embed (dead letters).
    pub rejected: IntCounter,
    /// `odcd_release_share`: the CPU share release work runs at now.
    pub share: Gauge,
}

impl ReleaseMetrics {
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let m = ReleaseMetrics {
            current_step: IntGauge::new(
                "odcd_release_current_step",
                "Training step of the current release's checkpoint (0: no release yet)",
            )?,
            pending: IntGauge::new(
                "odcd_release_pending",
                "1 while a promoted release is being built (backfill) and not yet current",
            )?,
            decisions: IntCounterVec::new(
                Opts::new(
                    "odcd_release_decisions_total",
                    "Candidate checkpoints judged: promoted, or rejected by reason",
                ),
                &["decision", "reason"],
            )?,
            candidate_step: IntGauge::new(
                "odcd_release_candidate_step",
                "Training step of the last candidate checkpoint judged",
            )?,
            scores: GaugeVec::new(
                Opts::new(
                    "odcd_release_candidate_score",
                    "Scores of the last judgement: effective_rank and knn_top1 (0..1) of the candidate, the current release, the untrained network and raw pixels",
                ),
                &["signal", "model"],
            )?,
            backfill_shards: IntGaugeVec::new(
                Opts::new(
                    "odcd_release_backfill_shards",
                    "Shards of the catalog the pending release holds (done) and still needs (todo)",
                ),
                &["state"],
            )?,
            backfill_rows: IntGauge::new(
                "odcd_release_backfill_rows",
                "Rows the pending release holds so far",
            )?,
            rows: IntCounter::new(
                "odcd_release_rows_total",
                "Rows embedded into releases by this process (backfill and fresh arrivals)",
            )?,
            fresh_delay: Histogram::with_opts(
                HistogramOpts::new(
                    "odcd_release_fresh_delay_seconds",
                    "From a new shard's arrival (its last-modified time) to its rows in the current release",
                )
                .buckets(vec![
                    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ]),
            )?,
            busy_seconds: Counter::new(
                "odcd_release_busy_seconds_total",
                "Wall time the release work kept its thread pool busy (bounded by releases.cpu_share)",
            )?,
            errors: IntCounter::new(
                "odcd_release_errors_total",
                "Pieces of release work that failed and are tried again (see the log)",
            )?,
            rejected: IntCounter::new(
                "odcd_release_records_rejected_total",
                "Catalog records a release could not embed (undecodable, ...): counted, dead-lettered, skipped",
            )?,
            share: Gauge::new(
                "odcd_release_share",
                "Share of the machine's cores release work runs at now (releases.cpu_share while training, 1 when finishing)",
            )?,
        };
        r.register(Box::new(m.current_step.clone()))?;
        r.register(Box::new(m.pending.clone()))?;
        r.register(Box::new(m.decisions.clone()))?;
        r.register(Box::new(m.candidate_step.clone()))?;
        r.register(Box::new(m.scores.clone()))?;
        r.register(Box::new(m.backfill_shards.clone()))?;
        r.register(Box::new(m.backfill_rows.clone()))?;
        r.register(Box::new(m.rows.clone()))?;
        r.register(Box::new(m.fresh_delay.clone()))?;
        r.register(Box::new(m.busy_seconds.clone()))?;
        r.register(Box::new(m.errors.clone()))?;
        r.register(Box::new(m.rejected.clone()))?;
        r.register(Box::new(m.share.clone()))?;
        // Every series exists from the start (a dashboard sees 0, not nothing).
        m.decisions.with_label_values(&["promoted", ""]);
        for reason in RejectReason::ALL {
            m.decisions
                .with_label_values(&["rejected", reason.as_str()]);
        }
        for state in ["done", "todo"] {
            m.backfill_shards.with_label_values(&[state]);
        }
        Ok(m)
    }

    pub fn rejected(&self, reason: RejectReason) {
        self.decisions
            .with_label_values(&["rejected", reason.as_str()])
            .inc();
    }

    pub fn promoted(&self) {
        self.decisions.with_label_values(&["promoted", ""]).inc();
    }
}
