//! `detectd compare`: a faster precision against exact fp32 on the user's own weights and
//! images. Random weights exaggerate rounding, and pretrained ones cannot be fetched
//! everywhere, so this is how someone with real weights judges a setting before serving it.

use std::path::Path;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::{inputs, resolve_weights, CacheArgs, Runtime};
use crate::imaging;
use crate::model::agreement::{ClassAgreement, DetectionAgreement, MIN_IOU, MIN_SCORE};
use crate::model::classifier::CROP;
use crate::model::detector::BOX_SCORE_THRESH;
use crate::model::transform::{prepare_classifier, prepare_detector};
use crate::model::Named;
use crate::model::{
    resolve_precision, ArchChoice, Classifier, DetectRequest, DetectorConfig, FasterRcnn,
    Precision, Preset,
};
use crate::weights::StateDict;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// Read from the checkpoint's keys.
    Auto,
    Detect,
    Classify,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Checkpoint (detector or classifier), or a published name.
    #[arg(long)]
    pub weights: String,
    #[arg(long, value_enum, default_value = "auto")]
    pub task: Task,
    /// Classifier preprocessing preset.
    #[arg(long, value_parser = super::named::<Preset>(), default_value = "v2")]
    pub preset: Preset,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: Runtime,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Image files, folders or quoted glob patterns.
    #[arg(required = true, value_name = "IMAGE|DIR|GLOB")]
    pub images: Vec<String>,
}

pub fn run(args: CompareArgs) -> anyhow::Result<std::process::ExitCode> {
    let (device, _) = args.runtime.resolve()?;
    let precision = resolve_precision(args.runtime.precision, device).0;
    let weights = resolve_weights(&args.weights, &args.cache)?;
    let (files, unmatched) = inputs::expand(&args.images);
    if let Some(u) = unmatched.first() {
        anyhow::bail!("{}: {}", u.arg, u.reason);
    }
    // Decoded one at a time as they are compared: a folder of photos is not held in memory.
    let images = files
        .iter()
        .map(|p| read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())));
    let task = match args.task {
        Task::Auto => task_of(&weights)?,
        t => t,
    };
    let compute = |p| resolve_precision(p, device).1;
    let figures = match task {
        Task::Classify => {
            let load = |p| Classifier::load(&weights, device, compute(p));
            let (exact, fast) = (load(Precision::Fp32)?, load(precision)?);
            let mut a = ClassAgreement::default();
            for img in images {
                let x = prepare_classifier(&img?.tensor, args.preset.resize(), CROP)?;
                let top = |m: &Classifier| m.classify(&[&x], 5);
                a.add(&top(&exact)?[0], &top(&fast)?[0]);
            }
            report_classes(&a, precision, args.json)
        }
        _ => {
            let load = |p| {
                let config = DetectorConfig {
                    arch: ArchChoice::Auto,
                    frozen_bn_eps: None,
                    device,
                    compute: compute(p),
                    params: Default::default(),
                };
                FasterRcnn::load(&weights, &config)
            };
            let (exact, fast) = (load(Precision::Fp32)?, load(precision)?);
            let mut a = DetectionAgreement::default();
            for img in images {
                let prepared = [prepare_detector(&img?.tensor)?];
                let requests = DetectRequest::each(&prepared, BOX_SCORE_THRESH);
                a.add(&exact.detect(&requests)?[0], &fast.detect(&requests)?[0], 0);
            }
            report_detections(&a, precision, args.json)
        }
    };
    println!("{figures}");
    Ok(std::process::ExitCode::SUCCESS)
}

fn read(path: &Path) -> anyhow::Result<imaging::RgbImage> {
    let bytes = std::fs::read(path)?;
    Ok(imaging::decode(&bytes, u64::MAX)?)
}

/// Detector or classifier, from the checkpoint's keys.
fn task_of(weights: &Path) -> anyhow::Result<Task> {
    let sd = StateDict::load(weights)?;
    if sd.has("roi_heads.box_predictor.cls_score.weight") {
        Ok(Task::Detect)
    } else if sd.has("fc.weight") {
        Ok(Task::Classify)
    } else {
        anyhow::bail!(
            "{}: neither a Faster R-CNN nor a ResNet-50 checkpoint; say --task",
            weights.display()
        )
    }
}

fn report_detections(a: &DetectionAgreement, p: Precision, as_json: bool) -> String {
    if as_json {
        return json!({"precision": p.name(), "task": "detect", "min_score": MIN_SCORE,
                      "min_iou": MIN_IOU, "agreement": a, "share": a.share()})
        .to_string();
    }
    format!(
        "{} against fp32: {} of {} fp32 detections scoring >= {MIN_SCORE} matched ({:.1}%; same label, IoU >= {MIN_IOU})\n\
         largest box drift {:.4} px, largest score drift {:.5} (matched pairs)",
        p.name(),
        a.matched,
        a.total,
        a.share() * 100.0,
        a.max_box_drift,
        a.max_score_drift
    )
}

fn report_classes(a: &ClassAgreement, p: Precision, as_json: bool) -> String {
    if as_json {
        return json!({"precision": p.name(), "task": "classify", "agreement": a,
                      "share": a.share()})
        .to_string();
    }
    let pct = |n: usize| n as f64 * 100.0 / a.images.max(1) as f64;
    format!(
        "{} against fp32 on {} images: top-1 equal on {} ({:.1}%), top-5 set equal on {} ({:.1}%)\n\
         largest top-5 probability drift {:.5}",
        p.name(),
        a.images,
        a.top1,
        pct(a.top1),
        a.top5,
        pct(a.top5),
        a.max_score_drift
    )
}
