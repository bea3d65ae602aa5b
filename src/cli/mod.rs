//! Command line: `detectd detect`, `detectd classify`, `detectd serve`, `detectd weights`.

mod bench;
mod serve;

use crate::model::{resolve_precision, Compute};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::api::{detections_json, predictions_json};
use crate::imaging;
use crate::labels::Labels;
use crate::model::detector::DetectorConfig;
use crate::model::transform::{prepare_classifier, prepare_detector, Prepared};
use crate::model::{
    device, ArchChoice, Classifier, DetectRequest, DeviceChoice, FasterRcnn, Precision, Preset,
};
use crate::weights::hub;

/// Images are run this many at a time, which bounds memory for long lists.
const CHUNK: usize = 4;

#[derive(Parser, Debug)]
#[command(
    name = "detectd",
    version,
    about = "Object detection and image classification, torchvision-exact, on libtorch"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Detect objects; prints one JSON line per image.
    Detect(DetectArgs),
    /// Classify images; prints one JSON line per image.
    Classify(ClassifyArgs),
    /// Time the detector or classifier in-process on synthetic images (JSON out).
    Bench(bench::BenchArgs),
    /// Serve /detect and /classify over HTTP.
    Serve(Box<serve::ServeArgs>),
    /// List or fetch torchvision's published checkpoints.
    #[command(subcommand)]
    Weights(WeightsCommand),
}

#[derive(Subcommand, Debug)]
pub enum WeightsCommand {
    /// The published checkpoints, their URLs and whether they are in the cache.
    List(CacheArgs),
    /// Download (or verify) published checkpoints into the cache; all when none is named.
    Fetch {
        #[command(flatten)]
        cache: CacheArgs,
        /// Names from `weights list` (e.g. fasterrcnn-v1, resnet50-v2).
        ids: Vec<String>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Where published weights are kept.
    #[arg(long, env = "DETECTD_CACHE_DIR", default_value_os_t = hub::default_cache_dir())]
    pub cache_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct Runtime {
    /// Where to run the model.
    #[arg(long, value_enum, default_value = "auto", env = "DETECTD_DEVICE")]
    pub device: DeviceChoice,
    /// Numeric precision: fp32 is torchvision's arithmetic; bf16/fp16 are faster.
    #[arg(long, value_enum, default_value = "fp32", env = "DETECTD_PRECISION")]
    pub precision: Precision,
    /// libtorch intra-op threads (default: all cores).
    #[arg(long, env = "DETECTD_THREADS")]
    pub threads: Option<i32>,
}

impl Runtime {
    /// Applies the thread setting and picks the device and how to compute on it.
    pub fn resolve(&self) -> anyhow::Result<(tch::Device, Compute)> {
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        let device = device::resolve(self.device)?;
        Ok((device, resolve_precision(self.precision, device).1))
    }
}

#[derive(Args, Debug)]
pub struct DetectArgs {
    /// Faster R-CNN checkpoint (.pth or .safetensors), or a published name (fasterrcnn-v1).
    #[arg(long)]
    pub weights: String,
    /// Architecture; auto reads it from the checkpoint's keys.
    #[arg(long, value_enum, default_value = "auto")]
    pub arch: ArchChoice,
    /// Class names, `id<TAB>name` or one per line (default: COCO for 91 classes).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Keep detections scoring above this.
    #[arg(long, default_value_t = 0.05)]
    pub score_threshold: f64,
    /// eps of v1's FrozenBatchNorm (default 0.0, as torchvision's COCO weights run).
    #[arg(long)]
    pub frozen_bn_eps: Option<f64>,
    #[command(flatten)]
    pub runtime: Runtime,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// ResNet-50 checkpoint (.pth or .safetensors), or a published name (resnet50-v2).
    #[arg(long)]
    pub weights: String,
    /// Preprocessing preset of the weights: v1 (resize 256) or v2 (resize 232).
    #[arg(long, value_enum, default_value = "v2")]
    pub preset: Preset,
    /// Class names (default: ImageNet for 1000 classes).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: i64,
    #[command(flatten)]
    pub runtime: Runtime,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Detect(args) => detect(args),
        Command::Classify(args) => classify(args),
        Command::Weights(cmd) => weights(cmd),
        Command::Serve(args) => serve::run(*args),
        Command::Bench(args) => bench::run(args),
    }
}

/// A checkpoint argument: a file, or the name of a published checkpoint (fetched if needed).
pub fn resolve_weights(arg: &str, cache: &CacheArgs) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(arg);
    if path.exists() {
        return Ok(path);
    }
    match hub::find(arg) {
        Some(p) => Ok(hub::ensure(&p, &cache.cache_dir)?),
        None => anyhow::bail!(
            "weights {arg}: no such file, nor a published name (see `detectd weights list`)"
        ),
    }
}

fn weights(cmd: WeightsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WeightsCommand::List(cache) => {
            for p in hub::PUBLISHED {
                let here = cache.cache_dir.join(p.file).exists();
                println!(
                    "{:<14} {:<8} {}  {}",
                    p.id,
                    if here { "cached" } else { "-" },
                    p.url(),
                    p.what
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        WeightsCommand::Fetch { cache, ids } => {
            let wanted = if ids.is_empty() {
                hub::PUBLISHED.to_vec()
            } else {
                ids.iter()
                    .map(|id| {
                        hub::find(id).ok_or_else(|| {
                            anyhow::anyhow!("unknown weights {id}; see `detectd weights list`")
                        })
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            for path in hub::ensure_all(&wanted, &cache.cache_dir).map_err(anyhow::Error::msg)? {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A decoded image or the reason it could not be read.
fn read_image(path: &PathBuf) -> Result<imaging::RgbImage, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    imaging::decode(&bytes, u64::MAX).map_err(|e| e.to_string())
}

/// Runs `each` over chunks of readable images, prints results in order, reports unreadable
/// files on stderr, and fails the exit code if any file failed.
fn for_each_image<T>(
    paths: &[PathBuf],
    prepare: impl Fn(&imaging::RgbImage) -> T,
    mut run: impl FnMut(&[T]) -> anyhow::Result<Vec<serde_json::Value>>,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let stdout = std::io::stdout();
    for chunk in paths.chunks(CHUNK) {
        let mut ok = Vec::new();
        let mut prepared = Vec::new();
        for path in chunk {
            match read_image(path) {
                Ok(img) => {
                    prepared.push(prepare(&img));
                    ok.push((path, img.width, img.height));
                }
                Err(e) => {
                    eprintln!("detectd: {}: {e}", path.display());
                    failed = true;
                }
            }
        }
        if prepared.is_empty() {
            continue;
        }
        let mut out = stdout.lock();
        for ((path, w, h), result) in ok.into_iter().zip(run(&prepared)?) {
            let mut line = json!({"image": path.display().to_string(), "width": w, "height": h});
            if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), result)
            {
                line.extend(fields);
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn detect(args: DetectArgs) -> anyhow::Result<ExitCode> {
    let (device, compute) = args.runtime.resolve()?;
    let config = DetectorConfig {
        arch: args.arch,
        frozen_bn_eps: args.frozen_bn_eps,
        device,
        compute,
    };
    let model = FasterRcnn::load(&resolve_weights(&args.weights, &args.cache)?, &config)?;
    let labels = Labels::for_model(args.labels.as_deref(), model.num_classes, Labels::coco)?;
    for_each_image(
        &args.images,
        |img| prepare_detector(&img.tensor),
        |images: &[Prepared]| {
            let requests = DetectRequest::each(images, args.score_threshold);
            let results = model.detect(&requests)?;
            Ok(results
                .iter()
                .map(|d| json!({"detections": detections_json(d, &labels)}))
                .collect())
        },
    )
}

fn classify(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    let (device, compute) = args.runtime.resolve()?;
    let model = Classifier::load(
        &resolve_weights(&args.weights, &args.cache)?,
        device,
        compute,
    )?;
    let labels = Labels::for_model(args.labels.as_deref(), model.num_classes, Labels::imagenet)?;
    let resize = args.preset.resize();
    for_each_image(
        &args.images,
        |img| prepare_classifier(&img.tensor, resize, crate::model::classifier::CROP),
        |images| {
            let refs: Vec<&tch::Tensor> = images.iter().collect();
            let results = model.classify(&refs, args.top_k)?;
            Ok(results
                .iter()
                .map(|p| json!({"predictions": predictions_json(p, &labels)}))
                .collect())
        },
    )
}
