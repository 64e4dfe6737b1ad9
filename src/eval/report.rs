//! `odcd report`: one self-contained HTML page about a checkpoint: curves over steps from the
//! checkpoint's history (loss, change ratio, empty / small clusters, in-daemon k-NN top-1),
//! the cluster-size histogram of the ODC memory, and for the largest clusters a mosaic of
//! member images (with the true-class make-up when the shards carry `.cls`). Everything is
//! inline (SVG, PNG/JPEG as data: URIs): the page needs no network. An inline script marks
//! the page once every image has loaded (`data-images-loaded` on <body>, `READY` title).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use super::cluster_metrics::{cluster_sizes, cluster_stats};
use super::history::History;
use super::EvalError;
use crate::checkpoint::{Checkpoint, Manifest};
use crate::source::{ObjectStoreSource, ObjectStoreSourceConfig, SourceMode, SourceState};

/// What `odcd report` shows.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub checkpoint_url: String,
    pub step: Option<u64>,
    /// Shards holding the member images (default: the run's `[source] url`).
    pub shards_url: Option<String>,
    pub options: BTreeMap<String, String>,
    pub out_dir: PathBuf,
    /// Largest clusters shown as mosaics.
    pub clusters: usize,
    /// Images per mosaic.
    pub per_cluster: usize,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ReportSummary {
    pub path: PathBuf,
    pub step: u64,
    pub history_points: usize,
    pub clusters_shown: usize,
    pub images: usize,
    pub images_missing: usize,
}

struct Image {
    mime: &'static str,
    bytes: bytes::Bytes,
}

fn mime_of(format: &str) -> Option<&'static str> {
    match format {
        "png" => Some("image/png"),
        "jpg" | "jpeg" => Some("image/jpeg"),
        "webp" => Some("image/webp"),
        _ => None,
    }
}

/// Standard base64 (RFC 4648) with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG line plot of one or more series (x = step).
pub fn line_plot(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    const COLORS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let (w, h, l, r, t, b) = (560.0, 240.0, 60.0, 20.0, 28.0, 36.0);
    let pts: Vec<&(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut s = format!(
        r#"<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}"><text x="{l}" y="18" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    if pts.is_empty() {
        let _ = write!(
            s,
            r##"<text x="{l}" y="{}" font-size="12" fill="#666">no data in this checkpoint's history</text></svg>"##,
            h / 2.0
        );
        return s;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in &pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
        y0 -= 1.0;
    }
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let sy = |y: f64| h - b - (y - y0) / (y1 - y0) * (h - t - b);
    let _ = write!(
        s,
        r##"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="#333"/>"##,
        h - b,
        w - r,
        h - b,
        h - b
    );
    for (v, y) in [
        (y0, sy(y0)),
        ((y0 + y1) / 2.0, sy((y0 + y1) / 2.0)),
        (y1, sy(y1)),
    ] {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="end">{}</text>"#,
            l - 4.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    for (v, x) in [(x0, sx(x0)), (x1, sx(x1))] {
        let _ = write!(
            s,
            r#"<text x="{x}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
            h - b + 14.0,
            fmt_num(v)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">step</text>"#,
        (l + w - r) / 2.0,
        h - 6.0
    );
    for (i, (name, p)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = p
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        if path.len() == 1 {
            let _ = write!(
                s,
                r#"<circle cx="{}" cy="{}" r="3" fill="{color}"/>"#,
                sx(p[0].0),
                sy(p[0].1)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" font-size="11" fill="{color}" text-anchor="end">{}</text>"#,
            w - r,
            t + 12.0 * (i as f64 + 1.0),
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// SVG bar chart of cluster sizes, largest first.
pub fn size_histogram(sizes: &[usize]) -> String {
    let (w, h, l, b, t) = (560.0, 220.0, 50.0, 30.0, 28.0);
    let mut sorted: Vec<usize> = sizes.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let max = sorted.first().copied().unwrap_or(0).max(1) as f64;
    let n = sorted.len().max(1) as f64;
    let bw = (w - l - 10.0) / n;
    let mut s = format!(
        r#"<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}"><text x="{l}" y="18" font-size="14" font-weight="bold">cluster sizes (largest first, K = {})</text>"#,
        sizes.len()
    );
    for (i, &v) in sorted.iter().enumerate() {
        let bh = v as f64 / max * (h - t - b);
        let _ = write!(
            s,
            r##"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="#1f77b4"><title>{v}</title></rect>"##,
            l + i as f64 * bw,
            h - b - bh,
            (bw - 0.5).max(0.5),
            bh
        );
    }
    let _ = write!(
        s,
        r##"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="#333"/><text x="{}" y="{}" font-size="11" text-anchor="end">{}</text><text x="{}" y="{}" font-size="11" text-anchor="end">0</text><text x="{}" y="{}" font-size="11" text-anchor="middle">clusters</text></svg>"##,
        h - b,
        w - 10.0,
        h - b,
        l - 4.0,
        t + 4.0,
        max as usize,
        l - 4.0,
        h - b,
        (l + w) / 2.0,
        h - 10.0
    );
    s
}

/// Reads the shards once: images of `wanted` keys, and the class label of every key.
async fn read_shards(
    url: &str,
    options: &BTreeMap<String, String>,
    wanted: &HashSet<String>,
    cancel: &CancellationToken,
) -> Result<(HashMap<String, Image>, HashMap<String, i64>), EvalError> {
    let url = crate::store::local_path_to_url(url, "--shards").map_err(|e| EvalError::Data {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    let mut cfg = ObjectStoreSourceConfig::new(url.clone());
    cfg.options = options.clone();
    cfg.mode = SourceMode::Once;
    let src = ObjectStoreSource::from_config(cfg).map_err(|e| EvalError::Data {
        url: url.clone(),
        message: e.to_string(),
    })?;
    let child = cancel.child_token();
    let mut rx = src.spawn(SourceState::default(), child.clone());
    let (mut images, mut labels) = (HashMap::new(), HashMap::new());
    loop {
        let item = tokio::select! {
            i = rx.recv() => i,
            _ = cancel.cancelled() => return Err(EvalError::Cancelled),
        };
        let Some(item) = item else { break };
        match item {
            Ok(rec) => {
                if let Some(l) = rec.class_label {
                    labels.insert(rec.key.clone(), l);
                }
                if wanted.contains(&rec.key) {
                    if let Some(mime) = mime_of(&rec.format) {
                        images.insert(
                            rec.key,
                            Image {
                                mime,
                                bytes: rec.image,
                            },
                        );
                    }
                }
            }
            Err(rej) => tracing::warn!("shards `{url}`: {rej}"),
        }
    }
    child.cancel();
    Ok((images, labels))
}

/// What the report needs to know of the run that wrote the checkpoint.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub arch: crate::model::Arch,
    pub num_clusters: usize,
    /// The run's object-store source (URL, options): where the member images are by
    /// default. None for a Kafka source.
    pub source_shards: Option<(String, BTreeMap<String, String>)>,
}

/// Builds the page of checkpoint `ckpt` of `run` and writes `<out_dir>/index.html`.
pub async fn write_report(
    opts: &ReportOptions,
    manifest: &Manifest,
    ckpt: &Checkpoint,
    run: &RunInfo,
    cancel: CancellationToken,
) -> Result<ReportSummary, EvalError> {
    let history = History::from_extra(&ckpt.extra);
    let mut html = String::new();
    let title = format!("odcd report: step {} ({})", ckpt.step, manifest.id);
    let _ = write!(
        html,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{}</title><style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.plot {{ border: 1px solid #ddd; background: #fff; }}
.cluster {{ display: inline-block; vertical-align: top; margin: 0 16px 16px 0; }}
.mosaic {{ display: grid; grid-template-columns: repeat(8, 36px); gap: 2px; }}
.mosaic img {{ width: 36px; height: 36px; image-rendering: pixelated; border: 1px solid #eee; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; }}
</style></head><body>"#,
        esc(&title)
    );
    let _ = write!(
        html,
        "<h1>{}</h1><p>checkpoint <code>{}</code> from <code>{}</code>, created at unix time {}; model {:?}, K = {}.</p>",
        esc(&title),
        esc(&manifest.id),
        esc(&opts.checkpoint_url),
        manifest.created_unix_secs,
        run.arch,
        run.num_clusters
    );

    // Curves over steps.
    let pts = &history.points;
    let xy = |f: &dyn Fn(&super::history::HistoryPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        pts.iter()
            .filter_map(|p| f(p).map(|y| (p.step as f64, y)))
            .collect()
    };
    let mut ks: Vec<String> = pts
        .iter()
        .flat_map(|p| p.knn_top1.keys().cloned())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    ks.sort_by_key(|k| k.parse::<usize>().unwrap_or(usize::MAX));
    let knn_series: Vec<(String, Vec<(f64, f64)>)> = ks
        .iter()
        .map(|k| {
            // Plot each evaluation at the step of the weights it measured, once.
            let mut seen = HashSet::new();
            let v: Vec<(f64, f64)> = pts
                .iter()
                .filter_map(|p| {
                    let s = p.knn_step?;
                    let y = *p.knn_top1.get(k)?;
                    seen.insert(s).then_some((s as f64, y))
                })
                .collect();
            (format!("k = {k}"), v)
        })
        .collect();
    let _ = write!(
        html,
        "<h2>Training over steps</h2><p>{} history points{}.</p><div class=\"plots\">",
        pts.len(),
        if pts.is_empty() {
            " (this checkpoint was written before odcd kept a history, or before the first progress line)"
        } else {
            ""
        }
    );
    html.push_str(&line_plot(
        "loss",
        &[("loss".into(), xy(&|p| Some(p.loss as f64)))],
    ));
    html.push_str(&line_plot(
        "change ratio",
        &[("change ratio".into(), xy(&|p| Some(p.change_ratio)))],
    ));
    html.push_str(&line_plot(
        "empty / small clusters",
        &[
            ("empty".into(), xy(&|p| Some(p.empty_clusters as f64))),
            ("small".into(), xy(&|p| Some(p.small_clusters as f64))),
        ],
    ));
    // What the user has without training, as flat lines over the same steps: the trained
    // curve belongs above them.
    let (lo, hi) = knn_series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
    let mut knn_series = knn_series;
    if lo.is_finite() {
        for (name, by_k) in &history.baselines {
            for k in &ks {
                if let Some(&y) = by_k.get(k) {
                    let label = format!("{} k = {k}", name.replace('_', " "));
                    knn_series.push((label, vec![(lo, y), (hi.max(lo + 1.0), y)]));
                }
            }
        }
    }
    html.push_str(&line_plot(
        "in-daemon k-NN top-1 ([eval]) and the untrained / raw-pixel baselines",
        &knn_series,
    ));
    html.push_str("</div>");

    // Clusters.
    let mut summary = ReportSummary {
        path: opts.out_dir.join("index.html"),
        step: ckpt.step,
        history_points: pts.len(),
        clusters_shown: 0,
        images: 0,
        images_missing: 0,
    };
    match &ckpt.memory {
        None => html.push_str("<h2>Clusters</h2><p>This checkpoint holds no ODC memory.</p>"),
        Some(mem) => {
            let sizes = cluster_sizes(&mem.labels, mem.config.k);
            let st = cluster_stats(&sizes);
            let _ = write!(
                html,
                "<h2>Clusters</h2><p>{} samples in memory, K = {}: {} empty, sizes {} to {}, size entropy {:.3} nats (ln K = {:.3}).</p>",
                st.samples,
                st.k,
                st.empty,
                st.min_size,
                st.max_size,
                st.size_entropy_nats,
                (st.k.max(1) as f64).ln()
            );
            html.push_str(&size_histogram(&sizes));
            let mut order: Vec<usize> = (0..sizes.len()).filter(|&c| sizes[c] > 0).collect();
            order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
            order.truncate(opts.clusters);
            let mut members: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
            let mut all_members: HashMap<u32, Vec<&str>> = HashMap::new();
            let shown: HashSet<u32> = order.iter().map(|&c| c as u32).collect();
            for (k, &l) in mem.keys.iter().zip(&mem.labels) {
                if shown.contains(&l) {
                    all_members.entry(l).or_default().push(k);
                    let m = members.entry(l).or_default();
                    if m.len() < opts.per_cluster {
                        m.push(k);
                    }
                }
            }
            let wanted: HashSet<String> = members
                .values()
                .flat_map(|v| v.iter().map(|s| s.to_string()))
                .collect();
            let (shards, shard_opts) = match (&opts.shards_url, &run.source_shards) {
                (Some(u), _) => (u.clone(), opts.options.clone()),
                (None, Some((url, options))) => (url.clone(), options.clone()),
                (None, None) => {
                    return Err(EvalError::Invalid {
                        field: "--shards".into(),
                        message: "the run trained from Kafka, so its images are not in shards: pass --shards URL with shards holding the same sample keys".into(),
                    })
                }
            };
            let (images, labels) = read_shards(&shards, &shard_opts, &wanted, &cancel).await?;
            let _ = write!(
                html,
                "<h2>The {} largest clusters</h2><p>Up to {} member images each, read from <code>{}</code>.{}</p>",
                order.len(),
                opts.per_cluster,
                esc(&shards),
                if labels.is_empty() {
                    ""
                } else {
                    " “classes” is the true-label make-up of all members (labels from <code>.cls</code>, never used in training)."
                }
            );
            for &c in &order {
                let c = c as u32;
                let _ = write!(
                    html,
                    "<div class=\"cluster\"><h3>cluster {c}: {} members</h3>",
                    sizes[c as usize]
                );
                if !labels.is_empty() {
                    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
                    let mut n = 0;
                    for k in all_members.get(&c).map(Vec::as_slice).unwrap_or(&[]) {
                        if let Some(&l) = labels.get(*k) {
                            *counts.entry(l).or_default() += 1;
                            n += 1;
                        }
                    }
                    let mut top: Vec<(i64, usize)> = counts.into_iter().collect();
                    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                    let parts: Vec<String> = top
                        .iter()
                        .take(3)
                        .map(|(l, k)| format!("{l}: {:.0}%", 100.0 * *k as f64 / n.max(1) as f64))
                        .collect();
                    let _ = write!(html, "<p>classes {}</p>", parts.join(", "));
                }
                html.push_str("<div class=\"mosaic\">");
                for k in members.get(&c).map(Vec::as_slice).unwrap_or(&[]) {
                    match images.get(*k) {
                        Some(img) => {
                            summary.images += 1;
                            let _ = write!(
                                html,
                                r#"<img alt="{}" title="{}" src="data:{};base64,{}">"#,
                                esc(k),
                                esc(k),
                                img.mime,
                                base64(&img.bytes)
                            );
                        }
                        None => summary.images_missing += 1,
                    }
                }
                html.push_str("</div></div>");
                summary.clusters_shown += 1;
            }
            if summary.images_missing > 0 {
                let _ = write!(
                    html,
                    "<p>{} member images were not found in <code>{}</code> (pass the shards the run trained on with --shards).</p>",
                    summary.images_missing,
                    esc(&shards)
                );
            }
        }
    }
    html.push_str(
        r#"<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok));
  document.title = (ok === imgs.length ? 'READY ' : 'BROKEN IMAGES ') + document.title;
});
</script></body></html>
"#,
    );
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| EvalError::Write {
        path: opts.out_dir.display().to_string(),
        message: e.to_string(),
    })?;
    let tmp = opts.out_dir.join(".index.html.tmp");
    std::fs::write(&tmp, html.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, &summary.path))
        .map_err(|e| EvalError::Write {
            path: summary.path.display().to_string(),
            message: e.to_string(),
        })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn plots_escape_titles_and_handle_empty_series() {
        let s = line_plot("a<b", &[("x".into(), vec![])]);
        assert!(s.contains("a&lt;b") && s.contains("no data"));
        let s = line_plot("loss", &[("loss".into(), vec![(0.0, 1.0), (10.0, 0.5)])]);
        assert!(s.contains("<polyline") && s.starts_with("<svg"));
        let h = size_histogram(&[3, 0, 5]);
        assert_eq!(h.matches("<rect").count(), 3);
    }
}
