//! `detectd bench`: in-process timing of the detector or classifier on synthetic images, for
//! scripts/bench (which runs torchvision beside it). Prints one JSON object.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::Runtime;
use crate::model::autotune::MIN_AGREEMENT;
use crate::model::classifier::CROP;
use crate::model::detector::DetectorConfig;
use crate::model::detector::BOX_SCORE_THRESH;
use crate::model::layers::{record_ops, OpCall};
use crate::model::transform::{prepare_classifier, prepare_detector};
use crate::model::Named;
use crate::model::{
    resolve_precision, ArchChoice, Classifier, DetectRequest, FasterRcnn, Precision, Preset,
};
use crate::service::{tune, BatchConfig, DetectorKind, ModelKind, ModelSpec, Tuned};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BenchModel {
    Detector,
    Classifier,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum)]
    pub model: BenchModel,
    #[arg(long)]
    pub weights: PathBuf,
    /// Images per call.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub batch: u16,
    /// Image size, HxW (each side 1..=10000; out of range is a usage error).
    #[arg(long, default_value = "800x1216", value_parser = parse_size)]
    pub size: (i64, i64),
    /// Timed calls (after one warm-up call).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub iters: u32,
    #[command(flatten)]
    pub runtime: Runtime,
    /// Also time each convolution and linear call of one pass alone, on random operands of
    /// the same shapes, kind and layout: what the model's own layer shapes reach on this
    /// machine, and the share of the pass they take.
    #[arg(long)]
    pub ops: bool,
    /// With --precision auto: where the trial's decision is cached (default: a fresh
    /// folder, so the trial runs).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// A Mask R-CNN without its masks (the mask head does not run): the cost of boxes alone.
    #[arg(long)]
    pub boxes_only: bool,
}

fn parse_size(s: &str) -> Result<(i64, i64), String> {
    let side = |v: &str| v.parse::<i64>().ok().filter(|v| (1..=10_000).contains(v));
    match s.split_once('x').map(|(h, w)| (side(h), side(w))) {
        Some((Some(h), Some(w))) => Ok((h, w)),
        _ => Err(format!("{s}: HxW, each side within 1..=10000")),
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let (device, _) = args.runtime.resolve()?;
    let (h, w) = args.size;
    let (precision, trial) = match args.runtime.precision {
        Precision::Auto => {
            let tuned = auto(&args, device)?;
            (tuned.precision, tuned.decision)
        }
        p => (resolve_precision(p, device).0, None),
    };
    let compute = resolve_precision(precision, device).1;
    tch::manual_seed(0);
    let images: Vec<Tensor> = (0..args.batch)
        .map(|_| Tensor::randint(256, [3, h, w], (Kind::Uint8, Device::Cpu)))
        .collect();
    let boxes_only = args.boxes_only;
    // Detections in the first image of the last call (masks and keypoints cost per detection).
    let detections = std::rc::Rc::new(std::cell::Cell::new(0usize));
    let counted = detections.clone();
    let mut call: Box<dyn FnMut() -> anyhow::Result<()>> = match args.model {
        BenchModel::Detector => {
            let config = DetectorConfig {
                arch: ArchChoice::Auto,
                frozen_bn_eps: None,
                device,
                compute,
                params: Default::default(),
            };
            let model = FasterRcnn::load(&args.weights, &config)?;
            crate::alloc::tune_for_model(model.largest_activation(args.batch.into()));
            Box::new(move || {
                let prepared = images
                    .iter()
                    .map(prepare_detector)
                    .collect::<Result<Vec<_>, _>>()?;
                let mut requests = DetectRequest::each(&prepared, BOX_SCORE_THRESH);
                if boxes_only {
                    requests.iter_mut().for_each(|r| r.mask_threshold = None);
                }
                let found = model.detect(&requests)?;
                counted.set(found.first().map_or(0, Vec::len));
                Ok(())
            })
        }
        BenchModel::Classifier => {
            let model = Classifier::load(&args.weights, device, compute)?;
            crate::alloc::tune_for_model(model.largest_activation(args.batch.into()));
            Box::new(move || {
                let prepared: Vec<_> = images
                    .iter()
                    .map(|i| prepare_classifier(i, Preset::V2.resize(), CROP))
                    .collect::<Result<Vec<_>, _>>()?;
                let _probs = model.probabilities(&prepared.iter().collect::<Vec<_>>())?;
                Ok(())
            })
        }
    };
    call()?;
    let mut times = Vec::with_capacity(args.iters as usize);
    for _ in 0..args.iters {
        let t = Instant::now();
        call()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let ops = if args.ops {
        let (result, calls) = record_ops(&mut call);
        result?;
        Some(time_ops(&calls, median)?)
    } else {
        None
    };
    let out = json!({
        "model": format!("{:?}", args.model).to_lowercase(),
        "precision": args.runtime.precision.name(),
        "ran": precision.name(),
        "trial": trial,
        "batch": args.batch,
        "size": format!("{h}x{w}"),
        "threads": tch::get_num_threads(),
        "seconds_per_call": median,
        "images_per_second": args.batch as f64 / median,
        "times": times,
        "ops": ops,
        "detections": detections.get(),
        "peak_rss_mb": crate::service::memory::peak_rss_mb(),
    });
    println!("{out}");
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs `auto`'s trial as the server does at warm-up, for this batch size.
fn auto(args: &BenchArgs, device: Device) -> anyhow::Result<Tuned> {
    let cache_dir = match &args.cache_dir {
        Some(d) => d.clone(),
        None => tempfile_dir()?,
    };
    let batch = BatchConfig {
        max_batch_size: args.batch as usize,
        max_batch_delay: std::time::Duration::ZERO,
        max_queue: args.batch as usize,
    };
    let (name, kind) = match args.model {
        BenchModel::Detector => (
            "detector",
            ModelKind::Detector(DetectorKind {
                arch: ArchChoice::Auto,
                frozen_bn_eps: None,
                params: Default::default(),
            }),
        ),
        BenchModel::Classifier => ("classifier", ModelKind::Classifier { preset: Preset::V2 }),
    };
    let spec = ModelSpec {
        name: name.into(),
        version: 1,
        weights: args.weights.clone(),
        labels: None,
        device,
        precision: Precision::Auto,
        warmup_images: 0,
        cache_dir: cache_dir.clone(),
        min_agreement: MIN_AGREEMENT,
        kind,
    };
    let tuned = tune(spec, &batch)?;
    if args.cache_dir.is_none() {
        let _ = std::fs::remove_dir_all(&cache_dir);
    }
    Ok(tuned)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("detectd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Times each recorded call alone (best of three after one untimed call) and sums them: the
/// pass's time if it were nothing but its convolutions and linears, each as fast as oneDNN
/// runs it in isolation.
fn time_ops(calls: &[OpCall], pass_seconds: f64) -> anyhow::Result<serde_json::Value> {
    let _no_grad = tch::no_grad_guard();
    let (mut seconds, mut flops) = (0.0, 0.0);
    for c in calls {
        let (x, w) = c.operands();
        let out = c.run(&x, &w);
        flops += c.flops(&out.size());
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            let _ = c.run(&x, &w);
            best = best.min(t.elapsed().as_secs_f64());
        }
        seconds += best;
    }
    Ok(json!({
        "calls": calls.len(),
        "gflop": flops / 1e9,
        "seconds": seconds,
        "gflop_per_second": flops / 1e9 / seconds,
        "share_of_pass": seconds / pass_seconds,
    }))
}
