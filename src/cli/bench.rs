//! `detectd bench`: in-process timing of the detector or classifier on synthetic images, for
//! scripts/bench (which runs torchvision beside it). Prints one JSON object.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::Runtime;
use crate::model::classifier::CROP;
use crate::model::detector::DetectorConfig;
use crate::model::transform::{prepare_classifier, prepare_detector};
use crate::model::{ArchChoice, Classifier, DetectRequest, FasterRcnn, Preset};

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
    /// Image size, HxW.
    #[arg(long, default_value = "800x1216")]
    pub size: String,
    /// Timed calls (after one warm-up call).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub iters: u32,
    #[command(flatten)]
    pub runtime: Runtime,
}

fn parse_size(s: &str) -> anyhow::Result<(i64, i64)> {
    let (h, w) = s
        .split_once('x')
        .ok_or_else(|| anyhow::anyhow!("--size is HxW"))?;
    let (h, w): (i64, i64) = (h.parse()?, w.parse()?);
    if !(1..=10_000).contains(&h) || !(1..=10_000).contains(&w) {
        anyhow::bail!("--size {s}: each side must be within 1..=10000");
    }
    Ok((h, w))
}

pub fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let (device, compute) = args.runtime.resolve()?;
    let (h, w) = parse_size(&args.size)?;
    tch::manual_seed(0);
    let images: Vec<Tensor> = (0..args.batch)
        .map(|_| Tensor::randint(256, [3, h, w], (Kind::Uint8, Device::Cpu)))
        .collect();
    let mut call: Box<dyn FnMut() -> anyhow::Result<()>> = match args.model {
        BenchModel::Detector => {
            let config = DetectorConfig {
                arch: ArchChoice::Auto,
                frozen_bn_eps: None,
                device,
                compute,
            };
            let model = FasterRcnn::load(&args.weights, &config)?;
            crate::alloc::tune_for_tensors();
            Box::new(move || {
                let prepared = images
                    .iter()
                    .map(prepare_detector)
                    .collect::<Result<Vec<_>, _>>()?;
                let requests = DetectRequest::each(&prepared, 0.05);
                model.detect(&requests)?;
                Ok(())
            })
        }
        BenchModel::Classifier => {
            let model = Classifier::load(&args.weights, device, compute)?;
            crate::alloc::tune_for_tensors();
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
    let out = json!({
        "model": format!("{:?}", args.model).to_lowercase(),
        "precision": args.runtime.precision.name(),
        "batch": args.batch,
        "size": args.size,
        "threads": tch::get_num_threads(),
        "seconds_per_call": median,
        "images_per_second": args.batch as f64 / median,
        "times": times,
    });
    println!("{out}");
    Ok(std::process::ExitCode::SUCCESS)
}
