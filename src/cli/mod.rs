//! Command line: `detectd detect`, `detectd classify`, `detectd serve`, `detectd weights`,
//! `detectd bench`, `detectd compare`, `detectd healthcheck`.

mod bench;
mod compare;
mod healthcheck;
mod inputs;
mod output;
mod serve;

use crate::model::{resolve_precision, Compute, Named};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::api::{detections_json, predictions_json};
use crate::imaging;
use crate::labels::{KeypointSchema, Labels, NamedDetection};
use crate::model::detector::DetectorConfig;
use crate::model::transform::{prepare_classifier, prepare_detector, Prepared};
use crate::model::{
    device, ArchChoice, Classifier, DetectRequest, DeviceChoice, FasterRcnn, Precision, Preset,
};
use crate::render;
use crate::service::{name_detection, MaskFormat};
use crate::weights::hub;
use output::{ImageInfo, Sink};

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
    /// Detect objects; one JSON line per image, or COCO results.
    Detect(DetectArgs),
    /// Classify images; one JSON line per image.
    Classify(ClassifyArgs),
    /// Time the detector or classifier in-process on synthetic images (JSON out).
    Bench(bench::BenchArgs),
    /// Serve the models over HTTP (JSON, OpenAPI, the page at /) and gRPC, several by name.
    Serve(Box<serve::ServeArgs>),
    /// A faster --precision against fp32 on your own weights and images: what agrees.
    Compare(compare::CompareArgs),
    /// Exit 0 when the server on DETECTD_LISTEN answers /healthz (the image's HEALTHCHECK).
    Healthcheck(healthcheck::HealthcheckArgs),
    /// List or fetch torchvision's published checkpoints.
    #[command(subcommand)]
    Weights(WeightsCommand),
}

#[derive(Subcommand, Debug)]
pub enum WeightsCommand {
    /// The published checkpoints, their URLs and whether (and where) they are cached.
    List(CacheArgs),
    /// Download and verify published checkpoints (all of them when none is named) or a URL.
    #[command(about = fetch_about())]
    Fetch(FetchArgs),
}

/// The help of `weights fetch`, counted and named from the table `weights list` prints, so
/// the two cannot disagree.
fn fetch_about() -> String {
    format!(
        "Download and verify published checkpoints (all {} when none is named) or a URL",
        hub::PUBLISHED.len()
    )
}

fn targets_help() -> String {
    let names = hub::PUBLISHED
        .iter()
        .map(|p| match p.aliases {
            [] => p.id.to_owned(),
            aliases => format!("{} ({})", p.id, aliases.join(", ")),
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("Published names ({names}; see `weights list`) or http(s) URLs")
}

#[derive(Args, Debug)]
pub struct FetchArgs {
    #[command(flatten)]
    pub cache: CacheArgs,
    /// SHA-256 a URL's file must have: all 64 hex digits or a prefix of at least 8.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Where to put the file (default: the cache folder, under the URL's file name).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Published names (listed from the table `weights list` prints) or http(s) URLs.
    #[arg(help = targets_help())]
    pub targets: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Where published weights are kept (default: $DETECTD_CACHE, else ~/.cache/detectd).
    #[arg(long, env = "DETECTD_CACHE_DIR", default_value_os_t = hub::default_cache_dir())]
    pub cache_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct Runtime {
    /// Where to run the model.
    #[arg(long, value_parser = named::<DeviceChoice>(), default_value = "auto", env = "DETECTD_DEVICE")]
    pub device: DeviceChoice,
    /// Numeric precision: fp32 is torchvision's arithmetic; bf16/fp16 are faster.
    #[arg(long, value_parser = named::<Precision>(), default_value = "fp32", env = "DETECTD_PRECISION")]
    pub precision: Precision,
    /// libtorch intra-op threads (default: all cores).
    #[arg(long, env = "DETECTD_THREADS", value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub threads: Option<i32>,
}

/// A value within 0..=1 (a score or a threshold).
pub fn unit_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not within 0..=1"))
    }
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

/// What to run on, in what batches, and where results go.
#[derive(Args, Debug)]
pub struct Batch {
    /// Result format.
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: output::Format,
    /// Write results to FILE instead of stdout (COCO also writes FILE.images.json).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Images per forward pass; bounds memory on long lists.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// Image files, folders (searched recursively for image extensions) or quoted glob
    /// patterns ('photos/*.jpg').
    #[arg(required = true, value_name = "IMAGE|DIR|GLOB")]
    pub images: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DetectArgs {
    /// Faster R-CNN checkpoint (.pth or .safetensors), or a published name (fasterrcnn-v1).
    #[arg(long)]
    pub weights: String,
    /// Architecture; auto reads it from the checkpoint's keys.
    #[arg(long, value_parser = named::<ArchChoice>(), default_value = "auto")]
    pub arch: ArchChoice,
    /// Class names, `id<TAB>name` or one per line (default: COCO for 91 classes).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Keep detections scoring above this (0..=1).
    #[arg(long, default_value_t = crate::model::detector::BOX_SCORE_THRESH, value_parser = unit_interval)]
    pub score_threshold: f64,
    /// eps of v1's FrozenBatchNorm (default 0.0, as torchvision's COCO weights run).
    #[arg(long)]
    pub frozen_bn_eps: Option<f64>,
    /// Mask models: rle (COCO's compressed RLE), polygon (outer contours) or none.
    #[arg(long, default_value = "rle", value_parser = ["rle", "polygon", "none"])]
    pub mask_format: String,
    /// Mask models: the probability a pixel must exceed to be in the mask (0..=1).
    #[arg(long, default_value_t = crate::model::detector::MASK_THRESHOLD, value_parser = unit_interval)]
    pub mask_threshold: f64,
    /// Also write each image with its boxes drawn under DIR, at its path as given.
    #[arg(long, value_name = "DIR")]
    pub render_dir: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: Runtime,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub batch: Batch,
}

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// ResNet-50 checkpoint (.pth or .safetensors), or a published name (resnet50-v2).
    #[arg(long)]
    pub weights: String,
    /// Preprocessing preset of the weights: v1 (resize 256) or v2 (resize 232).
    #[arg(long, value_parser = named::<Preset>(), default_value = "v2")]
    pub preset: Preset,
    /// Class names (default: ImageNet for 1000 classes).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(i64).range(1..=1000))]
    pub top_k: i64,
    #[command(flatten)]
    pub runtime: Runtime,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub batch: Batch,
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Detect(args) => detect(args),
        Command::Classify(args) => classify(args),
        Command::Weights(cmd) => weights(cmd),
        Command::Serve(args) => serve::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Healthcheck(args) => healthcheck::run(args),
    }
}

/// clap's parser for a model setting by the names the model layer gives it (the model's enums
/// carry no command-line derive).
pub(crate) fn named<T: Named + Send + Sync>() -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(T::ALL.iter().map(|v| v.name()))
        .try_map(|s| T::from_name(&s).ok_or_else(|| format!("unknown value {s:?}")))
}

/// A checkpoint argument: a file, or the name of a published checkpoint (fetched if needed).
pub fn resolve_weights(arg: &str, cache: &CacheArgs) -> anyhow::Result<PathBuf> {
    hub::resolve(arg, None, &cache.cache_dir).map_err(anyhow::Error::msg)
}

fn weights(cmd: WeightsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WeightsCommand::List(cache) => {
            list_weights(&cache.cache_dir);
            Ok(ExitCode::SUCCESS)
        }
        WeightsCommand::Fetch(args) => fetch_weights(args),
    }
}

fn list_weights(dir: &Path) {
    println!("{:<24} {:<16} {:<60} url", "name", "cached", "path");
    for p in hub::PUBLISHED {
        let path = dir.join(p.file);
        let names = std::iter::once(p.id)
            .chain(p.aliases.iter().copied())
            .collect::<Vec<_>>()
            .join(", ");
        let cached = match std::fs::metadata(&path) {
            Ok(m) => format!("{:.1} MB", m.len() as f64 / 1e6),
            Err(_) => "-".into(),
        };
        println!(
            "{names:<24} {cached:<16} {:<60} {}",
            path.display(),
            p.url()
        );
    }
}

fn fetch_weights(args: FetchArgs) -> anyhow::Result<ExitCode> {
    if args.targets.len() > 1 && (args.sha256.is_some() || args.output.is_some()) {
        anyhow::bail!("--sha256 and --output apply to one file: fetch one name or URL at a time");
    }
    let dir = &args.cache.cache_dir;
    if args.targets.is_empty() {
        for path in hub::ensure_all(&hub::PUBLISHED, dir).map_err(anyhow::Error::msg)? {
            println!("{}", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    for target in &args.targets {
        let path = fetch_one(target, &args)?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// One name or URL: a published name is checked by its known hash; a URL by --sha256 or the
/// hash in its file name. A URL with neither is fetched with a warning that gives its SHA-256
/// to pin: the loader reads tensors without running pickled code, so an unverified file can
/// give wrong answers but cannot run anything.
fn fetch_one(target: &str, args: &FetchArgs) -> anyhow::Result<PathBuf> {
    let src = match hub::find(target) {
        Some(_) if args.sha256.is_some() => {
            anyhow::bail!("{target}: published names carry their hash; --sha256 is for URLs")
        }
        Some(p) if args.output.is_none() => return Ok(hub::ensure(&p, &args.cache.cache_dir)?),
        Some(p) => p.source(),
        None if target.starts_with("http://") || target.starts_with("https://") => {
            hub::Source::from_url(target, args.sha256.as_deref())?
        }
        None => anyhow::bail!(
            "{target}: neither a published name (see `detectd weights list`) nor an http(s) URL"
        ),
    };
    let dest = args
        .output
        .clone()
        .unwrap_or_else(|| args.cache.cache_dir.join(&src.file));
    if src.sha256.is_some() && dest.exists() && hub::verify(&src, &dest).is_ok() {
        return Ok(dest);
    }
    let sha256 = hub::fetch(&src, &dest)?;
    if src.sha256.is_none() {
        eprintln!(
            "detectd: warning: {} is unverified (no --sha256); its SHA-256 is {sha256}, pass \
             --sha256 {sha256} to pin it",
            dest.display()
        );
    }
    Ok(dest)
}

/// An image that was read, with its pixels when they are to be drawn on.
struct Loaded {
    path: PathBuf,
    width: u32,
    height: u32,
    pixels: Option<image::RgbImage>,
}

impl Loaded {
    /// The image and its tensor, or the reason it could not be read.
    fn read(path: &Path, keep_pixels: bool) -> Result<(Loaded, imaging::RgbImage), String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let pixels = imaging::decode_pixels(&bytes, u64::MAX).map_err(|e| e.to_string())?;
        let tensor = imaging::to_tensor(&pixels).map_err(|e| e.to_string())?;
        let image = Loaded {
            path: path.to_owned(),
            width: tensor.width,
            height: tensor.height,
            pixels: keep_pixels.then_some(pixels),
        };
        Ok((image, tensor))
    }

    fn info(&self) -> ImageInfo<'_> {
        ImageInfo {
            path: &self.path,
            width: self.width,
            height: self.height,
        }
    }
}

/// Counts images on stderr when it is a terminal; hidden for pipes and logs.
fn progress(len: usize) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{pos}/{len} {wide_bar} {eta}") {
        bar.set_style(style);
    }
    bar
}

/// Runs `run` over batches of readable images and hands each result to `emit` in order.
/// Unreadable files and unmatched patterns are named on stderr and the others still run;
/// returns whether any failed.
fn for_each_image<T, R>(
    batch: &Batch,
    keep_pixels: bool,
    prepare: impl Fn(&imaging::RgbImage) -> Result<T, crate::model::ModelError>,
    mut run: impl FnMut(&[T]) -> anyhow::Result<Vec<R>>,
    mut emit: impl FnMut(&Loaded, R) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    let (paths, unmatched) = inputs::expand(&batch.images);
    let mut failed = !unmatched.is_empty();
    for u in unmatched {
        eprintln!("detectd: {}: {}", u.arg, u.reason);
    }
    let bar = progress(paths.len());
    for chunk in paths.chunks(usize::from(batch.batch_size)) {
        let mut loaded = Vec::new();
        let mut prepared = Vec::new();
        for path in chunk {
            // An image the model cannot take (a 1×2000 strip has no detector size) is named
            // and skipped like an unreadable one.
            let read = Loaded::read(path, keep_pixels).and_then(|(image, tensor)| {
                Ok((image, prepare(&tensor).map_err(|e| e.to_string())?))
            });
            match read {
                Ok((image, input)) => {
                    prepared.push(input);
                    loaded.push(image);
                }
                Err(e) => {
                    bar.suspend(|| eprintln!("detectd: {}: {e}", path.display()));
                    failed = true;
                }
            }
        }
        if !prepared.is_empty() {
            for (image, result) in loaded.iter().zip(run(&prepared)?) {
                emit(image, result)?;
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(failed)
}

fn exit_code(failed: bool) -> ExitCode {
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Writes `image` with `dets` drawn under `dir`: JPEG stays JPEG, anything else becomes PNG
/// (`x.webp` → `x.webp.png`, so two inputs never share an output name).
fn render_copy(dir: &Path, image: &Loaded, dets: &[NamedDetection]) -> anyhow::Result<()> {
    let Some(pixels) = &image.pixels else {
        return Ok(());
    };
    let mut dest = dir.join(inputs::relative_name(&image.path));
    let ext = dest
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = match ext.as_deref() {
        Some("jpg" | "jpeg") => render::Format::Jpeg,
        Some("png") => render::Format::Png,
        _ => {
            dest.as_mut_os_string().push(".png");
            render::Format::Png
        }
    };
    let mut canvas = pixels.clone();
    render::draw(&mut canvas, dets);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&dest, render::encode(&canvas, format)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dest.display()))
}

fn detect(args: DetectArgs) -> anyhow::Result<ExitCode> {
    let mut sink = Sink::open(args.batch.format, args.batch.output.as_deref())?;
    let (device, compute) = args.runtime.resolve()?;
    let config = DetectorConfig {
        arch: args.arch,
        frozen_bn_eps: args
            .frozen_bn_eps
            .or_else(|| hub::frozen_bn_eps_of(&args.weights)),
        device,
        compute,
        params: Default::default(),
    };
    let model = FasterRcnn::load(&resolve_weights(&args.weights, &args.cache)?, &config)?;
    crate::alloc::tune_for_model(model.largest_activation(1));
    let labels = Labels::for_detector(args.labels.as_deref(), model.family, model.num_classes)?;
    let mask_format = MaskFormat::parse(Some(&args.mask_format))?;
    let mask_threshold = (mask_format != MaskFormat::None).then_some(args.mask_threshold);
    let keypoints = model.num_keypoints().map(KeypointSchema::for_count);
    let failed = for_each_image(
        &args.batch,
        args.render_dir.is_some(),
        |img| prepare_detector(&img.tensor),
        |images: &[Prepared]| {
            let mut requests = DetectRequest::each(images, args.score_threshold);
            requests
                .iter_mut()
                .for_each(|r| r.mask_threshold = mask_threshold);
            Ok(model.detect(&requests)?)
        },
        |image, dets| {
            let dets: Vec<NamedDetection> = dets
                .iter()
                .map(|d| name_detection(d, &labels, mask_format, keypoints.as_ref()))
                .collect();
            if let Some(dir) = &args.render_dir {
                render_copy(dir, image, &dets)?;
            }
            sink.detections(&image.info(), &detections_json(dets))
        },
    )?;
    sink.finish(&labels, keypoints.as_ref())?;
    Ok(exit_code(failed))
}

fn classify(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    if args.batch.format == output::Format::Coco {
        anyhow::bail!("--format coco holds detections; classify writes jsonl only");
    }
    let mut sink = Sink::open(args.batch.format, args.batch.output.as_deref())?;
    let (device, compute) = args.runtime.resolve()?;
    let model = Classifier::load(
        &resolve_weights(&args.weights, &args.cache)?,
        device,
        compute,
    )?;
    crate::alloc::tune_for_model(model.largest_activation(args.batch.batch_size.into()));
    let labels = Labels::for_model(args.labels.as_deref(), model.num_classes, Labels::imagenet)?;
    let resize = args.preset.resize();
    let failed = for_each_image(
        &args.batch,
        false,
        |img| prepare_classifier(&img.tensor, resize, crate::model::classifier::CROP),
        |images| {
            let refs: Vec<&tch::Tensor> = images.iter().collect();
            Ok(model.classify(&refs, args.top_k)?)
        },
        |image, preds| {
            let preds = predictions_json(labels.predictions(&preds));
            sink.predictions(&image.info(), &preds)
        },
    )?;
    sink.finish(&labels, None)?;
    Ok(exit_code(failed))
}
