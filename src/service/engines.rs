//! The two models as batch engines: what a queued image carries and how a batch runs.

use crate::model::resolve_precision;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use tch::{Device, Tensor};

use super::{ModelInfo, Preparer, Served};
use crate::batch::{BatchConfig, Batcher, Engine};
use crate::imaging::RgbImage;
use crate::labels::Labels;
use crate::metrics::Metrics;
use crate::model::classifier::CROP;
use crate::model::detector::DetectorConfig;
use crate::model::transform::{
    check_classifier, check_detector, classifier_size, detector_size, prepare_classifier,
    prepare_detector, Prepared,
};
use crate::model::{
    ArchChoice, Classifier, DetectRequest, Detection, FasterRcnn, ModelError, Precision,
    Prediction, Preset,
};

/// A detector input: the image resized and normalized, and the request's score threshold
/// (the model applies it before NMS, as torchvision applies its own 0.05).
pub struct DetectInput {
    prepared: Prepared,
    score_threshold: f64,
}

impl DetectInput {
    pub fn new(img: &RgbImage, score_threshold: f64) -> Result<Self, ModelError> {
        Ok(Self {
            prepared: prepare_detector(&img.tensor)?,
            score_threshold,
        })
    }

    pub(crate) fn preparer(score_threshold: f64) -> Preparer<Self> {
        Preparer {
            check: Box::new(check_detector),
            resized_pixels: Box::new(|h, w| pixels(detector_size(h, w))),
            prepare: Arc::new(move |img| Self::new(img, score_threshold)),
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
            prepare: Arc::new(move |img| Self::new(img, preset, top_k)),
        }
    }
}

struct DetectorEngine(FasterRcnn);

impl Engine for DetectorEngine {
    type Input = DetectInput;
    type Output = Vec<Detection>;

    fn run(&mut self, inputs: Vec<DetectInput>) -> Result<Vec<Vec<Detection>>, ModelError> {
        let requests: Vec<DetectRequest> = inputs
            .iter()
            .map(|i| DetectRequest {
                image: &i.prepared,
                score_threshold: i.score_threshold,
            })
            .collect();
        self.0.detect(&requests)
    }

    /// On the CPU the detector runs images one pass each, so a batch would only hold the
    /// first answers back until the last image is done.
    fn max_images_per_run(&self) -> usize {
        self.0.images_per_forward
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
}

pub struct DetectorSpec {
    pub weights: PathBuf,
    pub arch: ArchChoice,
    pub frozen_bn_eps: Option<f64>,
    pub labels: Option<PathBuf>,
    pub device: Device,
    pub precision: Precision,
    pub warmup_images: usize,
}

pub struct ClassifierSpec {
    pub weights: PathBuf,
    pub preset: Preset,
    pub labels: Option<PathBuf>,
    pub device: Device,
    pub precision: Precision,
    pub warmup_images: usize,
}

/// A neutral image of a common camera size, for warm-up.
fn warmup_image() -> RgbImage {
    let (h, w) = (480, 640);
    RgbImage {
        width: w,
        height: h,
        tensor: Tensor::full(
            [3, h as i64, w as i64],
            114,
            (tch::Kind::Uint8, Device::Cpu),
        ),
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

type Started<I, O> = (
    Served<I, O>,
    tokio::sync::oneshot::Receiver<Result<(), ModelError>>,
    JoinHandle<()>,
);

/// Loads the detector here (so a bad file fails the start at once), then hands it to its
/// worker thread, which warms it up before it reports ready.
pub fn start_detector(
    spec: DetectorSpec,
    batch: BatchConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Started<DetectInput, Vec<Detection>>> {
    let (precision, compute) = resolve_precision(spec.precision, spec.device);
    let config = DetectorConfig {
        arch: spec.arch,
        frozen_bn_eps: spec.frozen_bn_eps,
        device: spec.device,
        compute,
    };
    let model = FasterRcnn::load(&spec.weights, &config)?;
    let labels = Labels::for_model(spec.labels.as_deref(), model.num_classes, Labels::coco)?;
    let info = ModelInfo {
        name: "detector".into(),
        arch: format!(
            "fasterrcnn_resnet50_fpn_{}",
            format!("{:?}", model.arch).to_lowercase()
        ),
        device: device_name(spec.device),
        precision: precision.name().into(),
        num_classes: model.num_classes,
    };
    let warm = spec.warmup_images;
    Ok(spawn_warm(
        DetectorEngine(model),
        warm,
        |img| DetectInput::new(img, 0.05),
        info,
        labels,
        batch,
        metrics,
    ))
}

/// Hands a loaded model to its worker thread, which runs `warm` neutral images through it
/// (so the first request is not the slow one) before reporting ready.
fn spawn_warm<E: Engine + Send>(
    mut engine: E,
    warm: usize,
    input: impl Fn(&RgbImage) -> Result<E::Input, ModelError> + Send + 'static,
    info: ModelInfo,
    labels: Labels,
    batch: BatchConfig,
    metrics: Arc<Metrics>,
) -> Started<E::Input, E::Output> {
    let name = info.name.clone();
    let (batcher, started, handle) = Batcher::spawn(&name, batch, metrics, move || {
        let malloc = crate::alloc::tune_for_tensors();
        tracing::info!(?malloc, "weights loaded, warming up");
        if warm > 0 {
            let img = warmup_image();
            let inputs = (0..warm).map(|_| input(&img)).collect::<Result<_, _>>()?;
            engine.run(inputs)?;
        }
        Ok(engine)
    });
    (
        Served {
            batcher,
            info,
            labels,
        },
        started,
        handle,
    )
}

pub fn start_classifier(
    spec: ClassifierSpec,
    batch: BatchConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Started<ClassifyInput, Vec<Prediction>>> {
    let (precision, compute) = resolve_precision(spec.precision, spec.device);
    let model = Classifier::load(&spec.weights, spec.device, compute)?;
    let labels = Labels::for_model(spec.labels.as_deref(), model.num_classes, Labels::imagenet)?;
    let info = ModelInfo {
        name: "classifier".into(),
        arch: format!("resnet50 (preset {:?})", spec.preset).to_lowercase(),
        device: device_name(spec.device),
        precision: precision.name().into(),
        num_classes: model.num_classes,
    };
    let (warm, preset) = (spec.warmup_images, spec.preset);
    let input = move |img: &RgbImage| ClassifyInput::new(img, preset, 1);
    Ok(spawn_warm(
        ClassifierEngine(model),
        warm,
        input,
        info,
        labels,
        batch,
        metrics,
    ))
}
