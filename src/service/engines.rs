//! The two models as batch engines: what a queued image carries and how a batch runs.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use tch::{Device, Tensor};

use super::memory;
use super::{Loaded, ModelInfo, Preparer, Served, Tuned};
use crate::batch::{BatchConfig, Batcher, Engine, Member, ModelLabels, Pace};
use crate::imaging::RgbImage;
use crate::labels::{KeypointSchema, Labels};
use crate::metrics::Metrics;
use crate::model::agreement::{ClassAgreement, DetectionAgreement};
use crate::model::autotune::{self, candidates, time_passes, Decision, DecisionCache, TrialKey};
use crate::model::classifier::CROP;
use crate::model::detector::{DetectorConfig, DetectorParams, Family, MASK_THRESHOLD};
use crate::model::transform::{
    check_classifier, classifier_size, prepare_classifier, DetectorResize, Prepared,
};
use crate::model::Named;
use crate::model::{
    resolve_precision, ArchChoice, Classifier, DetectRequest, Detection, FasterRcnn, ModelError,
    Precision, Prediction, Preset,
};

/// A detector input: the image resized and normalized, and the request's score threshold
/// (the model applies it before NMS, as torchvision applies its `box_score_thresh`).
pub struct DetectInput {
    prepared: Parked,
    score_threshold: f64,
    mask_threshold: Option<f64>,
}

/// A prepared image while it waits for the model: its f32 pixels in a Rust buffer, which the
/// global allocator maps on its own (`alloc`), not a libtorch tensor in the heap the model's
/// passes reuse. Queued inputs live for seconds; dozens of them (10 MB each at 800×1066) left
/// between the activations fragmented that heap and grew it with every client of a burst.
struct Parked {
    pixels: Vec<f32>,
    original: (i64, i64),
    resized: (i64, i64),
}

impl DetectInput {
    /// The pixels of its padded input: the work `DetectorResize::units` counts.
    fn units(&self) -> u64 {
        let (h, w) = self.prepared.resized;
        let padded = Prepared::padded_size(h, w);
        (padded.0.max(0) as u64) * (padded.1.max(0) as u64)
    }
}

impl Parked {
    fn park(p: Prepared) -> Result<Self, ModelError> {
        let numel = p.tensor.numel();
        let mut pixels = vec![0f32; numel];
        p.tensor
            .f_contiguous()
            .and_then(|t| t.f_copy_data(&mut pixels, numel))
            .map_err(|e| ModelError::Inference(format!("parking an input: {e}")))?;
        Ok(Self {
            pixels,
            original: p.original,
            resized: p.resized,
        })
    }

    /// The same pixels as a tensor again, for the run.
    fn prepared(&self) -> Result<Prepared, ModelError> {
        let (h, w) = self.resized;
        let tensor = Tensor::f_from_slice(&self.pixels)
            .and_then(|t| t.f_view([3, h, w]))
            .map_err(|e| ModelError::Inference(format!("unparking an input: {e}")))?;
        Ok(Prepared {
            tensor,
            original: self.original,
            resized: self.resized,
        })
    }
}

impl DetectInput {
    pub fn new(
        img: &RgbImage,
        resize: DetectorResize,
        score_threshold: f64,
        mask_threshold: Option<f64>,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            prepared: Parked::park(resize.prepare(&img.tensor)?)?,
            score_threshold,
            mask_threshold,
        })
    }

    pub(crate) fn preparer(
        resize: DetectorResize,
        score_threshold: f64,
        mask_threshold: Option<f64>,
    ) -> Preparer<Self> {
        Preparer {
            check: Box::new(move |h, w| resize.check(h, w)),
            resized_pixels: Box::new(move |h, w| pixels(resize.size(h, w))),
            units: Box::new(move |h, w| resize.units(h, w)),
            prepare: Arc::new(move |img| Self::new(img, resize, score_threshold, mask_threshold)),
        }
    }
}

fn pixels((h, w): (i64, i64)) -> u64 {
    (h.max(0) as u64).saturating_mul(w.max(0) as u64)
}

pub struct ClassifyInput {
    tensor: Tensor,
    top_k: usize,
}

impl ClassifyInput {
    pub fn new(img: &RgbImage, preset: Preset, top_k: usize) -> Result<Self, ModelError> {
        Ok(Self {
            tensor: prepare_classifier(&img.tensor, preset.resize(), CROP)?,
            top_k,
        })
    }

    pub(crate) fn preparer(preset: Preset, top_k: usize) -> Preparer<Self> {
        let resize = preset.resize();
        Preparer {
            check: Box::new(move |h, w| check_classifier(h, w, resize)),
            resized_pixels: Box::new(move |h, w| pixels(classifier_size(h, w, resize))),
            // Every image is a 224 crop: one unit, as `Engine::units` counts by default.
            units: Box::new(|_, _| 1),
            prepare: Arc::new(move |img| Self::new(img, preset, top_k)),
        }
    }
}

struct DetectorEngine(FasterRcnn);

impl Engine for DetectorEngine {
    type Input = DetectInput;
    type Output = Vec<Detection>;

    fn run(&mut self, inputs: Vec<DetectInput>) -> Result<Vec<Vec<Detection>>, ModelError> {
        let prepared = inputs
            .iter()
            .map(|i| i.prepared.prepared())
            .collect::<Result<Vec<_>, _>>()?;
        let requests: Vec<DetectRequest> = inputs
            .iter()
            .zip(&prepared)
            .map(|(i, prepared)| DetectRequest {
                image: prepared,
                score_threshold: i.score_threshold,
                mask_threshold: i.mask_threshold,
            })
            .collect();
        self.0.detect(&requests)
    }

    /// On the CPU the detector runs images one pass each, so a batch would only hold the
    /// first answers back until the last image is done.
    fn max_images_per_run(&self) -> usize {
        self.0.images_per_forward
    }

    fn units(&self, input: &DetectInput) -> u64 {
        input.units()
    }

    fn largest_activation(&self, images: usize) -> usize {
        self.0.largest_activation(images)
    }
}

struct ClassifierEngine(Classifier);

impl Engine for ClassifierEngine {
    type Input = ClassifyInput;
    type Output = Vec<Prediction>;

    fn run(&mut self, inputs: Vec<ClassifyInput>) -> Result<Vec<Vec<Prediction>>, ModelError> {
        let k = inputs.iter().map(|i| i.top_k).max().unwrap_or(1);
        let tensors: Vec<&Tensor> = inputs.iter().map(|i| &i.tensor).collect();
        let mut out = self.0.classify(&tensors, k as i64)?;
        for (preds, input) in out.iter_mut().zip(&inputs) {
            preds.truncate(input.top_k);
        }
        Ok(out)
    }

    fn largest_activation(&self, images: usize) -> usize {
        self.0.largest_activation(images)
    }
}

/// What to load and how to serve it, whatever the task.
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    pub weights: PathBuf,
    pub labels: Option<PathBuf>,
    pub device: Device,
    pub precision: Precision,
    pub warmup_images: usize,
    /// Where `auto` keeps its decisions.
    pub cache_dir: PathBuf,
    /// The agreement with fp32 `auto` requires.
    pub min_agreement: f64,
    pub kind: ModelKind,
}

/// What the task's model needs besides what every model does.
#[derive(Clone, Copy, Debug)]
pub enum ModelKind {
    Detector(DetectorKind),
    Classifier { preset: Preset },
}

/// A detector's own settings.
#[derive(Clone, Copy, Debug)]
pub struct DetectorKind {
    pub arch: ArchChoice,
    pub frozen_bn_eps: Option<f64>,
    pub params: DetectorParams,
}

/// `n` different images of a common camera size with smooth colour fields and a few solid
/// rectangles: warm-up and `auto`'s trial inputs, where a flat image would agree trivially.
pub fn trial_images(n: usize, (h, w): (i64, i64)) -> Vec<RgbImage> {
    let opts = (tch::Kind::Float, Device::Cpu);
    let ys = Tensor::arange(h, opts).view([1, h, 1]);
    let xs = Tensor::arange(w, opts).view([1, 1, w]);
    (0..n)
        .map(|i| {
            let f = 0.011 + 0.004 * i as f64;
            let phase = Tensor::from_slice(&[0.0f32, 2.1, 4.2]).view([3, 1, 1]) + i as f64;
            let field = (&ys * f + &phase).sin() * (&xs * (f * 0.7) - &phase).cos() * 90.0 + 128.0;
            for r in 0..4i64 {
                let (k, i) = (r + 1, i as i64);
                let (top, left) = ((37 * k + 53 * i) % (h / 2), (71 * k + 29 * i) % (w / 2));
                let colour = Tensor::from_slice(&[
                    (40 * k + 60 * i) % 256,
                    (90 * k) % 256,
                    (200 - 30 * k) % 256,
                ])
                .to_kind(tch::Kind::Float)
                .view([3, 1, 1]);
                field
                    .narrow(1, top, h / 4)
                    .narrow(2, left, w / 5)
                    .copy_(&colour.expand([3, h / 4, w / 5], false));
            }
            RgbImage {
                width: w as u32,
                height: h as u32,
                tensor: field.clamp(0.0, 255.0).to_kind(tch::Kind::Uint8),
            }
        })
        .collect()
}

const TRIAL_SIZE: (i64, i64) = (480, 640);

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// Answers once the worker's model is warm (or failed to get there).
type Warm = tokio::sync::oneshot::Receiver<Result<(), ModelError>>;

/// A model on its worker, the channel that answers once it is warm, and the worker.
type Started = (Loaded, Warm, JoinHandle<()>);

/// What a worker needs to make its engine: a model loaded at start (so a bad file fails the
/// start at once), and, with `auto`, how to load the other candidates for the trial.
struct Plan<E: Engine> {
    engine: E,
    precision: Precision,
    load: Box<dyn Fn(Precision) -> Result<E, ModelError> + Send>,
    trial: Option<Trial>,
    /// Images per run (the trial times runs of the batch size the server will run).
    per_run: usize,
    /// Trial or warm-up images.
    images: usize,
    input: MakeInput<E::Input>,
    agree: Agree<E::Output>,
    /// What loading the weights added to the resident memory.
    loaded_bytes: Option<u64>,
}

/// Decoded image to the engine's input.
type MakeInput<I> = Box<dyn Fn(&RgbImage) -> Result<I, ModelError> + Send>;

type Agree<O> = Box<dyn Fn(&Vec<O>, &Vec<O>) -> f64 + Send>;

impl<E: Engine> Plan<E> {
    /// `auto`'s trial (or, with a precision set, a warm-up pass over `images` trial images,
    /// so the first request is not the slow one): the engine to serve with, warm.
    /// The version's memory is what loading added plus the warm-up's peak above that. The
    /// warm runs' times seed `pace`, so admission can estimate waits from the first request.
    fn make(self, pace: &Pace) -> Result<(E, Tuned), ModelError> {
        let loaded = self.loaded_bytes;
        let (made, warm) = memory::measured(|| self.warm(pace));
        let (engine, mut tuned) = made?;
        tuned.memory_bytes = loaded.zip(warm).map(|(l, w)| l + w);
        Ok((engine, tuned))
    }

    fn warm(self, pace: &Pace) -> Result<(E, Tuned), ModelError> {
        let images = trial_images(self.images, TRIAL_SIZE);
        let input = self.input;
        let per_run = self.per_run.max(1);
        let pass = |engine: &mut E| run_all(engine, &images, per_run, &input, None);
        match self.trial {
            None => {
                let mut engine = self.engine;
                run_all(&mut engine, &images, per_run, &input, Some(pace))?;
                let tuned = Tuned {
                    precision: self.precision,
                    decision: None,
                    memory_bytes: None,
                };
                Ok((engine, tuned))
            }
            Some(trial) => {
                let (engine, decision) =
                    choose_precision(self.engine, &*self.load, trial, pass, self.agree)?;
                // The chosen setting's best pass over the trial images, per run.
                let runs = self.images.div_ceil(per_run).max(1);
                let run = per_run.min(self.images.max(1));
                let chosen = |m: &&autotune::Measured| m.precision == decision.chosen;
                let measured = decision.measured.iter().find(chosen);
                if let (Some(m), Some(first)) = (measured, images.first()) {
                    let units = input(first).map_or(1, |i| engine.units(&i)) * run as u64;
                    let per = std::time::Duration::from_secs_f64(m.seconds / runs as f64);
                    pace.record(run, units, per);
                }
                let tuned = Tuned {
                    precision: decision.precision().unwrap_or(Precision::Fp32),
                    decision: Some(decision),
                    memory_bytes: None,
                };
                Ok((engine, tuned))
            }
        }
    }
}

/// An `auto` trial still to run on the worker.
struct Trial {
    /// What the decision's key is made of; hashed on the worker, not at start.
    weights: PathBuf,
    arch: String,
    batch: usize,
    cache: DecisionCache,
    device: Device,
    min_agreement: f64,
}

fn detector_config(d: DetectorKind, device: Device, precision: Precision) -> DetectorConfig {
    DetectorConfig {
        arch: d.arch,
        frozen_bn_eps: d.frozen_bn_eps,
        device,
        compute: resolve_precision(precision, device).1,
        params: d.params,
    }
}

/// The precision a model is loaded in at start: the one asked for, or with `auto` fp32, the
/// trial's reference.
fn loaded_first(p: Precision, device: Device) -> Precision {
    match p {
        Precision::Auto => Precision::Fp32,
        p => resolve_precision(p, device).0,
    }
}

/// `auto`'s trial for a model, or None when its precision was set explicitly.
fn plan_trial(
    precision: Precision,
    device: Device,
    weights: &std::path::Path,
    cache_dir: &std::path::Path,
    min_agreement: f64,
    arch: &str,
    batch: usize,
) -> Option<Trial> {
    (precision == Precision::Auto).then(|| Trial {
        weights: weights.to_owned(),
        arch: arch.into(),
        batch,
        cache: DecisionCache::new(cache_dir),
        device,
        min_agreement,
    })
}

/// Loads the model here (so a bad file fails the start at once), then hands it to its
/// worker thread, which runs `auto`'s trial or warms it up before it reports ready.
pub fn start(
    spec: ModelSpec,
    batch: BatchConfig,
    cpu: Option<Member>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Started> {
    Ok(match spec.kind {
        ModelKind::Detector(kind) => {
            let (plan, info, labels) = detector_plan(spec, kind, &batch)?;
            let (served, started, worker) = spawn_worker(plan, info, labels, batch, cpu, metrics);
            let params = kind.params;
            (Loaded::Detector { served, params }, started, worker)
        }
        ModelKind::Classifier { preset } => {
            let (plan, info, labels) = classifier_plan(spec, preset, &batch)?;
            let (served, started, worker) = spawn_worker(plan, info, labels, batch, cpu, metrics);
            (Loaded::Classifier { served, preset }, started, worker)
        }
    })
}

/// What `spec` runs in once warm (running `auto`'s trial when it is asked for), without
/// serving it: `detectd bench --precision auto`.
pub fn tune(spec: ModelSpec, batch: &BatchConfig) -> anyhow::Result<Tuned> {
    let pace = Pace::default();
    Ok(match spec.kind {
        ModelKind::Detector(kind) => detector_plan(spec, kind, batch)?.0.make(&pace)?.1,
        ModelKind::Classifier { preset } => classifier_plan(spec, preset, batch)?.0.make(&pace)?.1,
    })
}

fn detector_plan(
    spec: ModelSpec,
    kind: DetectorKind,
    batch: &BatchConfig,
) -> anyhow::Result<(Plan<DetectorEngine>, ModelInfo, Labels)> {
    let first = loaded_first(spec.precision, spec.device);
    let device = spec.device;
    let (model, loaded_bytes) =
        memory::measured(|| FasterRcnn::load(&spec.weights, &detector_config(kind, device, first)));
    let model = model?;
    let labels = Labels::for_detector(spec.labels.as_deref(), model.family, model.num_classes)?;
    let arch = model.arch_name();
    let info = ModelInfo {
        name: spec.name.clone(),
        version: spec.version,
        arch: arch.clone(),
        device: device_name(spec.device),
        precision: spec.precision.name().into(),
        num_classes: model.num_classes,
        masks: model.family == Family::MaskRcnn,
        keypoints: model.num_keypoints().map(KeypointSchema::for_count),
    };
    let per_run = batch.max_batch_size.min(model.images_per_forward).max(1);
    let trial = plan_trial(
        spec.precision,
        spec.device,
        &spec.weights,
        &spec.cache_dir,
        spec.min_agreement,
        &arch,
        per_run,
    );
    // One image: a detector pass is seconds long on a CPU, and each compares ≥ 20 boxes.
    let images = if trial.is_some() {
        per_run
    } else {
        spec.warmup_images
    };
    let resize = kind.params.resize();
    let score = kind.params.box_score_thresh;
    let weights = spec.weights;
    let load = move |p: Precision| {
        FasterRcnn::load(&weights, &detector_config(kind, device, p)).map(DetectorEngine)
    };
    let agree = |reference: &Vec<Vec<Detection>>, other: &Vec<Vec<Detection>>| {
        let mut a = DetectionAgreement::default();
        for (r, o) in reference.iter().zip(other) {
            a.add(r, o, TRIAL_DETECTIONS);
        }
        a.share()
    };
    let plan = Plan {
        engine: DetectorEngine(model),
        precision: first,
        load: Box::new(load),
        trial,
        per_run,
        images,
        // Masks too, so that a mask model's warm-up (and its measured memory) includes them.
        input: Box::new(move |img| DetectInput::new(img, resize, score, Some(MASK_THRESHOLD))),
        agree: Box::new(agree),
        loaded_bytes,
    };
    Ok((plan, info, labels))
}

/// Reference detections a trial compares at least (the best ones, when fewer score ≥ 0.3).
const TRIAL_DETECTIONS: usize = 20;
const TRIAL_CLASSIFIER_IMAGES: usize = 20;

/// Hands a loaded model to its worker thread, which makes it ready (`Plan::make`) and then
/// serves it.
fn spawn_worker<E: Engine + Send + 'static>(
    plan: Plan<E>,
    info: ModelInfo,
    labels: Labels,
    batch: BatchConfig,
    cpu: Option<Member>,
    metrics: Arc<Metrics>,
) -> (Served<E::Input, E::Output>, Warm, JoinHandle<()>) {
    let labels_of_metrics = ModelLabels::new(&info.name, info.version);
    let tuned = Arc::new(OnceLock::new());
    let served_tuned = tuned.clone();
    let gauge_info = info.clone();
    let worker_metrics = metrics.clone();
    let load = move |pace: &Pace| {
        let largest = plan.engine.largest_activation(plan.per_run);
        let malloc = crate::alloc::tune_for_model(largest);
        tracing::info!(?malloc, "weights loaded, warming up");
        let (engine, result) = plan.make(pace)?;
        worker_metrics
            .model_info
            .with_label_values(&[
                &gauge_info.name,
                &gauge_info.version.to_string(),
                &gauge_info.arch,
                &gauge_info.device,
                result.precision.name(),
            ])
            .set(1);
        let _ = tuned.set(result);
        Ok(engine)
    };
    let (batcher, started, handle) = Batcher::spawn(labels_of_metrics, batch, metrics, cpu, load);
    (
        Served {
            batcher,
            info,
            labels,
            tuned: served_tuned,
        },
        started,
        handle,
    )
}

/// Runs `images` through `engine` in runs of `per_run`, answers in order. With a `pace`, the
/// runs are timed into it, all but a first of several (the cold one, which builds oneDNN's
/// primitives and is slower than any that follow).
fn run_all<E: Engine>(
    engine: &mut E,
    images: &[RgbImage],
    per_run: usize,
    input: impl Fn(&RgbImage) -> Result<E::Input, ModelError>,
    pace: Option<&Pace>,
) -> Result<Vec<E::Output>, ModelError> {
    let mut out = Vec::with_capacity(images.len());
    let runs = images.chunks(per_run.max(1));
    let several = runs.len() > 1;
    for (i, run) in runs.enumerate() {
        let inputs = run.iter().map(&input).collect::<Result<Vec<_>, _>>()?;
        let units = inputs.iter().map(|i| engine.units(i)).sum();
        let started = std::time::Instant::now();
        out.extend(engine.run(inputs)?);
        if let Some(pace) = pace.filter(|_| i > 0 || !several) {
            pace.record(run.len(), units, started.elapsed());
        }
    }
    Ok(out)
}

/// `auto`: the cached decision for this key, or a trial of every candidate (under the key's
/// lock, so replicas on one machine run one trial), then the chosen model.
fn choose_precision<E: Engine>(
    fp32: E,
    load: &dyn Fn(Precision) -> Result<E, ModelError>,
    trial: Trial,
    pass: impl Fn(&mut E) -> Result<Vec<E::Output>, ModelError>,
    agree: impl Fn(&Vec<E::Output>, &Vec<E::Output>) -> f64,
) -> Result<(E, Decision), ModelError> {
    // Hashing the weights (a few hundred ms) happens here, on the worker, off the start path.
    let key = match TrialKey::new(trial.device, &trial.arch, trial.batch, &trial.weights) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(error = %e, "weights not hashed; measuring without the precision cache");
            None
        }
    };
    let lock = key.as_ref().map(|_| trial.cache.lock());
    if let Some(Err(e)) = &lock {
        tracing::warn!(error = %e, "precision cache not usable; measuring without it");
    }
    if let Some(mut decision) = key.as_ref().and_then(|k| trial.cache.get(k)) {
        // The measurements hold for any bar; the choice is made again for this one.
        let p = autotune::choose(&decision.measured, trial.min_agreement);
        decision.chosen = p.name().into();
        decision.min_agreement = trial.min_agreement;
        tracing::info!(precision = p.name(), "precision from the cache");
        let mut engine = if p == Precision::Fp32 { fp32 } else { load(p)? };
        pass(&mut engine)?;
        return Ok((engine, decision));
    }
    let mut fp32 = Some(fp32);
    let run = |p: Precision| {
        let mut engine = match fp32.take() {
            Some(e) if p == Precision::Fp32 => e,
            _ => load(p)?,
        };
        let (seconds, answers) = time_passes(|| pass(&mut engine))?;
        Ok((engine, seconds, answers))
    };
    let (engine, decision) =
        autotune::trial(&candidates(trial.device), trial.min_agreement, run, agree)?;
    tracing::info!(chosen = %decision.chosen, seconds = decision.trial_seconds, "precision trial done");
    if let Some(Err(e)) = key.map(|k| trial.cache.put(&k, &decision)) {
        tracing::warn!(error = %e, "precision decision not cached");
    }
    drop(lock);
    Ok((engine, decision))
}

fn classifier_plan(
    spec: ModelSpec,
    preset: Preset,
    batch: &BatchConfig,
) -> anyhow::Result<(Plan<ClassifierEngine>, ModelInfo, Labels)> {
    let first = loaded_first(spec.precision, spec.device);
    let compute = |p| resolve_precision(p, spec.device).1;
    let (model, loaded_bytes) =
        memory::measured(|| Classifier::load(&spec.weights, spec.device, compute(first)));
    let model = model?;
    let labels = Labels::for_model(spec.labels.as_deref(), model.num_classes, Labels::imagenet)?;
    let arch = format!("resnet50 (preset {preset:?})").to_lowercase();
    let info = ModelInfo {
        name: spec.name.clone(),
        version: spec.version,
        arch: arch.clone(),
        device: device_name(spec.device),
        precision: spec.precision.name().into(),
        num_classes: model.num_classes,
        masks: false,
        keypoints: None,
    };
    let per_run = batch.max_batch_size;
    let trial = plan_trial(
        spec.precision,
        spec.device,
        &spec.weights,
        &spec.cache_dir,
        spec.min_agreement,
        "resnet50",
        per_run,
    );
    // Top-1 agreement in steps of 1/20: one flip among 20 images still passes 95%.
    let images = if trial.is_some() {
        TRIAL_CLASSIFIER_IMAGES.max(per_run)
    } else {
        spec.warmup_images
    };
    let (weights, device) = (spec.weights, spec.device);
    let load = move |p: Precision| {
        Classifier::load(&weights, device, resolve_precision(p, device).1).map(ClassifierEngine)
    };
    let agree = |reference: &Vec<Vec<Prediction>>, other: &Vec<Vec<Prediction>>| {
        let mut a = ClassAgreement::default();
        for (r, o) in reference.iter().zip(other) {
            a.add(r, o);
        }
        a.share()
    };
    let plan = Plan {
        engine: ClassifierEngine(model),
        precision: first,
        load: Box::new(load),
        trial,
        per_run,
        images,
        input: Box::new(move |img| ClassifyInput::new(img, preset, 5)),
        agree: Box::new(agree),
        loaded_bytes,
    };
    Ok((plan, info, labels))
}
