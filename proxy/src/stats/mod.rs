//! Counters and gauges with Envoy's stat names, and their `/stats` renderings.
//!
//! Components own typed stat structs made of [`Counter`]s and [`Gauge`]s (plain atomics, so
//! the request path never locks) and register them with the [`Store`] as a [`Source`]. The
//! store only walks sources when an admin request asks, producing [`Sample`]s that carry both
//! Envoy's full name (`cluster.web.upstream_rq_200`) and its tag-extracted form
//! (`cluster.upstream_rq` with `envoy_cluster_name="web"`, `envoy_response_code="200"`), which
//! is what `/stats/prometheus` prints — the same series names an Envoy user alerts on.
//!
//! It must not know about clusters, listeners or HTTP; they describe their own stats.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Decrements a gauge when dropped (active requests, active connections).
#[derive(Debug)]
pub struct GaugeGuard<T: AsRef<Gauge>>(T);

impl<T: AsRef<Gauge>> GaugeGuard<T> {
    pub fn new(g: T) -> Self {
        g.as_ref().inc();
        Self(g)
    }

    /// What the guard holds (the stats the gauge belongs to).
    pub fn inner(&self) -> &T {
        &self.0
    }
}

impl<T: AsRef<Gauge>> Drop for GaugeGuard<T> {
    fn drop(&mut self) {
        self.0.as_ref().dec();
    }
}

impl AsRef<Gauge> for Gauge {
    fn as_ref(&self) -> &Gauge {
        self
    }
}

/// Response code counters: the class (`2xx`) and, when asked for, each code (`200`).
#[derive(Debug)]
pub struct CodeStats {
    classes: [Counter; 5],
    codes: Option<Box<[Counter]>>,
}

impl CodeStats {
    /// `with_codes`: also count each code (Envoy does for clusters, not for the HCM).
    pub fn new(with_codes: bool) -> Self {
        Self {
            classes: Default::default(),
            codes: with_codes.then(|| (100..600).map(|_| Counter::default()).collect()),
        }
    }

    pub fn record(&self, code: u16) {
        if !(100..600).contains(&code) {
            return;
        }
        self.classes[usize::from(code / 100 - 1)].inc();
        if let Some(codes) = &self.codes {
            codes[usize::from(code - 100)].inc();
        }
    }

    /// Emits `<base>_<N>xx` and `<base>_<code>` for every class and code seen.
    pub fn collect(&self, scope: &Scope, base: &str, out: &mut Vec<Sample>) {
        for (i, c) in self.classes.iter().enumerate() {
            let v = c.get();
            if v > 0 {
                let class = (i + 1).to_string();
                scope.sample_tagged(
                    &format!("{base}_{class}xx"),
                    &format!("{base}_xx"),
                    ("envoy_response_code_class", class),
                    Kind::Counter,
                    v,
                    out,
                );
            }
        }
        if let Some(codes) = &self.codes {
            for (i, c) in codes.iter().enumerate() {
                let v = c.get();
                if v > 0 {
                    let code = (i + 100).to_string();
                    scope.sample_tagged(
                        &format!("{base}_{code}"),
                        base,
                        ("envoy_response_code", code),
                        Kind::Counter,
                        v,
                        out,
                    );
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One stat value at collection time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Envoy's full name, e.g. `cluster.web.upstream_rq_200`.
    pub name: String,
    /// The name with tag values removed, e.g. `cluster.upstream_rq`.
    pub tag_extracted_name: String,
    pub tags: Vec<(&'static str, String)>,
    pub kind: Kind,
    pub value: i64,
}

/// Where a group of stats lives: `cluster.<name>.` with the tag `envoy_cluster_name`, or a
/// fixed prefix such as `server.`.
#[derive(Debug, Clone)]
pub struct Scope {
    prefix: String,
    extracted_prefix: String,
    tags: Vec<(&'static str, String)>,
}

impl Scope {
    /// A scope without tags (`server.`, `listener_manager.`).
    pub fn fixed(prefix: &str) -> Self {
        Self {
            prefix: format!("{prefix}."),
            extracted_prefix: format!("{prefix}."),
            tags: Vec::new(),
        }
    }

    /// A scope named by a tag value: `<root>.<value>.` extracted to `<root>.` with `tag`.
    pub fn tagged(root: &str, tag: &'static str, value: &str) -> Self {
        Self {
            prefix: format!("{root}.{value}."),
            extracted_prefix: format!("{root}."),
            tags: vec![(tag, value.to_string())],
        }
    }

    pub fn counter(&self, name: &str, value: u64, out: &mut Vec<Sample>) {
        self.sample(
            name,
            Kind::Counter,
            i64::try_from(value).unwrap_or(i64::MAX),
            out,
        );
    }

    pub fn gauge(&self, name: &str, value: i64, out: &mut Vec<Sample>) {
        self.sample(name, Kind::Gauge, value, out);
    }

    fn sample(&self, name: &str, kind: Kind, value: i64, out: &mut Vec<Sample>) {
        out.push(Sample {
            name: format!("{}{name}", self.prefix),
            tag_extracted_name: format!("{}{name}", self.extracted_prefix),
            tags: self.tags.clone(),
            kind,
            value,
        });
    }

    fn sample_tagged(
        &self,
        name: &str,
        extracted: &str,
        tag: (&'static str, String),
        kind: Kind,
        value: u64,
        out: &mut Vec<Sample>,
    ) {
        let mut tags = Vec::with_capacity(self.tags.len() + 1);
        tags.push(tag);
        tags.extend(self.tags.iter().cloned());
        out.push(Sample {
            name: format!("{}{name}", self.prefix),
            tag_extracted_name: format!("{}{extracted}", self.extracted_prefix),
            tags,
            kind,
            value: i64::try_from(value).unwrap_or(i64::MAX),
        });
    }
}

/// Anything that reports stats.
pub trait Source: Send + Sync {
    fn collect(&self, out: &mut Vec<Sample>);
}

impl<F: Fn(&mut Vec<Sample>) + Send + Sync> Source for F {
    fn collect(&self, out: &mut Vec<Sample>) {
        self(out)
    }
}

/// The registry of stat sources.
#[derive(Default)]
pub struct Store {
    owned: Mutex<Vec<Arc<dyn Source>>>,
    weak: Mutex<Vec<Weak<dyn Source>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A source that lives as long as the store.
    pub fn register(&self, source: Arc<dyn Source>) {
        lock(&self.owned).push(source);
    }

    /// A source owned elsewhere (a cluster's stats); it disappears when its owner drops it.
    pub fn register_weak(&self, source: Weak<dyn Source>) {
        lock(&self.weak).push(source);
    }

    /// Every stat, sorted by full name.
    pub fn samples(&self) -> Vec<Sample> {
        let owned: Vec<Arc<dyn Source>> = lock(&self.owned).clone();
        let weak: Vec<Arc<dyn Source>> = {
            let mut w = lock(&self.weak);
            w.retain(|s| s.strong_count() > 0);
            w.iter().filter_map(Weak::upgrade).collect()
        };
        let mut out = Vec::new();
        for s in owned.iter().chain(weak.iter()) {
            s.collect(&mut out);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Envoy's `/stats` text: `name: value`, one per line, sorted.
pub fn render_text(samples: &[Sample]) -> String {
    let mut out = String::new();
    for s in samples {
        let _ = writeln!(out, "{}: {}", s.name, s.value);
    }
    out
}

/// `/stats?format=json`.
pub fn render_json(samples: &[Sample]) -> serde_json::Value {
    let stats: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| serde_json::json!({ "name": s.name, "value": s.value }))
        .collect();
    serde_json::json!({ "stats": stats })
}

/// Envoy's `/stats/prometheus`: tag-extracted names prefixed `envoy_`, tags as labels.
pub fn render_prometheus(samples: &[Sample]) -> String {
    let mut groups: BTreeMap<String, (Kind, Vec<&Sample>)> = BTreeMap::new();
    for s in samples {
        groups
            .entry(prometheus_name(&s.tag_extracted_name))
            .or_insert_with(|| (s.kind, Vec::new()))
            .1
            .push(s);
    }
    let mut out = String::new();
    for (name, (kind, samples)) in groups {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in samples {
            let labels: Vec<String> = s
                .tags
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = writeln!(out, "{name}{{{}}} {}", labels.join(","), s.value);
        }
    }
    out
}

fn prometheus_name(extracted: &str) -> String {
    let mut name = String::with_capacity(extracted.len() + 6);
    name.push_str("envoy_");
    for c in extracted.chars() {
        name.push(if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        });
    }
    name
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_render_with_envoy_names_and_tags() {
        let codes = CodeStats::new(true);
        codes.record(200);
        codes.record(200);
        codes.record(503);
        let scope = Scope::tagged("cluster", "envoy_cluster_name", "web");
        let mut out = Vec::new();
        scope.counter("upstream_rq_total", 3, &mut out);
        codes.collect(&scope, "upstream_rq", &mut out);
        out.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            render_text(&out),
            "cluster.web.upstream_rq_200: 2\ncluster.web.upstream_rq_2xx: 2\ncluster.web.upstream_rq_503: 1\ncluster.web.upstream_rq_5xx: 1\ncluster.web.upstream_rq_total: 3\n"
        );
        let prom = render_prometheus(&out);
        assert!(
            prom.contains("# TYPE envoy_cluster_upstream_rq counter\n"),
            "{prom}"
        );
        assert!(
            prom.contains(
                "envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"web\"} 2\n"
            ),
            "{prom}"
        );
        assert!(
            prom.contains(
                "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"5\",envoy_cluster_name=\"web\"} 1\n"
            ),
            "{prom}"
        );
        assert!(
            prom.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"web\"} 3\n"),
            "{prom}"
        );
    }

    #[test]
    fn store_drops_weak_sources_with_their_owner() {
        let store = Store::new();
        store.register(Arc::new(|out: &mut Vec<Sample>| {
            Scope::fixed("server").gauge("state", 0, out)
        }));
        let owned: Arc<dyn Source> = Arc::new(|out: &mut Vec<Sample>| {
            Scope::tagged("cluster", "envoy_cluster_name", "gone").counter("x", 1, out)
        });
        store.register_weak(Arc::downgrade(&owned));
        assert_eq!(store.samples().len(), 2);
        drop(owned);
        let names: Vec<String> = store.samples().into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["server.state"]);
        assert_eq!(
            render_prometheus(&store.samples()),
            "# TYPE envoy_server_state gauge\nenvoy_server_state{} 0\n"
        );
    }
}
