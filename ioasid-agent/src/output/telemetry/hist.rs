//! Histograms exported from the kernel's exact bucket counts (the prometheus crate's own
//! histograms only take observations one by one): `ioasid_wbinvd_handler_seconds{vm}` and
//! `ioasid_wbinvd_flush_cpus`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use ioasid_common::cost::{COST_BUCKETS_NS, FLUSH_CPUS_LEN, FLUSH_CPU_BUCKETS};

use crate::engine::accounting::CostHist;
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricFamily, MetricType},
};

/// What the histogram collector exports, replaced by each sweep.
#[derive(Debug, Default)]
pub struct CostSnapshot {
    pub per_vm: BTreeMap<String, CostHist>,
    pub flush_cpus: [u64; FLUSH_CPUS_LEN as usize],
}

/// Exports `ioasid_wbinvd_handler_seconds{vm}` and `ioasid_wbinvd_flush_cpus` from kernel counts
/// (the prometheus crate's own histograms only take observations one by one).
#[derive(Clone)]
pub(super) struct HistCollector {
    descs: Vec<Desc>,
    snap: Arc<Mutex<CostSnapshot>>,
}

/// A histogram from per-bucket counts; `per_bucket` has one more entry than `bounds` (+Inf),
/// which only enters the total count.
fn histogram(bounds: impl Iterator<Item = f64>, per_bucket: &[u64], sum: f64) -> proto::Histogram {
    let mut h = proto::Histogram::default();
    let mut cumulative = 0;
    let buckets = bounds
        .zip(per_bucket.iter())
        .map(|(upper, n)| {
            cumulative += n;
            let mut b = proto::Bucket::default();
            b.set_upper_bound(upper);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    h.set_bucket(buckets);
    h.set_sample_count(per_bucket.iter().sum());
    h.set_sample_sum(sum);
    h
}

fn family(name: &str, help: &str, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(MetricType::HISTOGRAM);
    f.set_metric(metrics);
    f
}

pub(super) const HANDLER_HELP: &str =
    "Time KVM spent handling each guest WBINVD, by VM (source: see ioasid_wbinvd_cost_source).";
pub(super) const FLUSH_CPUS_HELP: &str =
    "Physical CPUs reached by each WBINVD flush of a non-coherent VM (0: none; needs a flush-cpus hook, see status).";

impl HistCollector {
    /// The collector, and the snapshot each sweep replaces.
    pub(super) fn new() -> (Self, Arc<Mutex<CostSnapshot>>) {
        let snap = Arc::new(Mutex::new(CostSnapshot::default()));
        let desc = |name: &str, help: &str, labels: Vec<String>| {
            Desc::new(name.into(), help.into(), labels, Default::default()).expect("valid metric definition")
        };
        let descs = vec![
            desc("ioasid_wbinvd_handler_seconds", HANDLER_HELP, vec!["vm".into()]),
            desc("ioasid_wbinvd_flush_cpus", FLUSH_CPUS_HELP, vec![]),
        ];
        (Self { descs, snap: snap.clone() }, snap)
    }
}

impl Collector for HistCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = self.snap.lock().unwrap_or_else(|e| e.into_inner());
        let bounds = || COST_BUCKETS_NS.iter().map(|ns| *ns as f64 / 1e9);
        let per_vm = snap
            .per_vm
            .iter()
            .map(|(vm, h)| {
                let mut m = proto::Metric::default();
                let mut l = proto::LabelPair::default();
                l.set_name("vm".into());
                l.set_value(vm.clone());
                m.set_label(vec![l]);
                m.set_histogram(histogram(bounds(), &h.buckets, h.sum_ns as f64 / 1e9));
                m
            })
            .collect();
        let mut flush = proto::Metric::default();
        flush.set_histogram(histogram(
            FLUSH_CPU_BUCKETS.iter().map(|b| f64::from(*b)),
            &snap.flush_cpus,
            0.0,
        ));
        vec![
            family("ioasid_wbinvd_handler_seconds", HANDLER_HELP, per_vm),
            family("ioasid_wbinvd_flush_cpus", FLUSH_CPUS_HELP, vec![flush]),
        ]
    }
}
