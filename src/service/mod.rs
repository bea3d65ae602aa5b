//! The serving core between the edges and the models: decodes and preprocesses images off
//! the async threads, queues them for the model's worker, and waits with a deadline. Every
//! edge (HTTP, gRPC) asks through one call, `Service::infer`, with images (encoded files or
//! raw pixels) and the task's options, and gets plain results back; no tensor crosses it.

mod admission;
mod calls;
mod decoding;
mod engines;
pub mod memory;
mod params;
pub mod registry;
pub mod settings;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use crate::batch::{BatchConfig, Timing};
use crate::batch::{Batcher, SubmitError};
use crate::imaging::{self, ImageError};
use crate::labels::{Labels, NamedDetection, NamedPrediction};
use crate::metrics::Metrics;
use crate::model::autotune::Decision;
use crate::model::transform::SizeError;
use crate::model::{Detection, ModelError, Named, Precision, Prediction};

pub use crate::imaging::ImageInput;
pub use crate::model::Task;
pub use admission::{Admission, InFlight};
pub use calls::{Call, Key};
pub use decoding::Decoding;
pub use engines::{
    trial_images, tune, ClassifyInput, DetectInput, DetectorKind, ModelKind, ModelSpec,
};
pub use params::{
    name_detection, ClassifyOptions, DetectOptions, MaskFormat, DEFAULT_TOP_K, MAX_TOP_K,
};
pub use registry::{
    LoadContext, LoadError, Loaded, ModelState, Registry, Started, Starting, State, Version,
};
pub use settings::{ModelSettings, SettingsDefaults, SettingsError};

/// What the edge reports about a loaded model version.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelInfo {
    pub name: String,
    /// Counts up from 1 with each load of the name.
    pub version: u64,
    pub arch: String,
    pub device: String,
    pub precision: String,
    pub num_classes: i64,
    /// A Mask R-CNN: detections carry masks. (`/v1/models` lists outputs; answers do not.)
    #[serde(skip)]
    pub masks: bool,
    /// A Keypoint R-CNN: its keypoints' names and skeleton.
    #[serde(skip)]
    pub keypoints: Option<crate::labels::KeypointSchema>,
}

impl ModelInfo {
    /// What a detector's detections carry: `boxes`, and `masks` or `keypoints`.
    pub fn outputs(&self) -> Vec<String> {
        let mut out = vec!["boxes".to_string()];
        if self.masks {
            out.push("masks".into());
        }
        if self.keypoints.is_some() {
            out.push("keypoints".into());
        }
        out
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("image {index}: {source}")]
    Image { index: usize, source: ImageError },
    #[error("image {index}: {reason}")]
    Unusable { index: usize, reason: String },
    #[error("the request holds {count} images; at most {limit} are taken per request")]
    TooManyImages { count: usize, limit: usize },
    #[error("no {0} is loaded on this server")]
    NotLoaded(&'static str),
    #[error("no model named {0:?} on this server")]
    ModelNotFound(String),
    #[error("model {name:?} does not do this: it is for {task}")]
    WrongTask { name: String, task: &'static str },
    #[error("model {0:?} is still loading")]
    NotReady(String),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("the server is shutting down")]
    Draining,
    #[error("the queue is full")]
    QueueFull,
    /// Refused at admission: the work queued ahead would keep it past its deadline.
    #[error("overloaded: the expected wait of {expected_s:.1} s is past the request's deadline ({budget_s:.1} s); retry in {retry_after_s} s")]
    Overloaded {
        expected_s: f64,
        budget_s: f64,
        /// When the queue ahead is expected to have drained enough.
        retry_after_s: u64,
    },
    #[error("the request timed out")]
    Timeout,
    #[error("{0}")]
    Model(#[from] ModelError),
}

/// One model behind its queue, with what preparing its inputs needs.
pub struct Served<I, O> {
    pub batcher: Batcher<I, O>,
    /// As known at start; `info()` adds the precision `auto` settled on.
    info: ModelInfo,
    pub labels: Labels,
    /// Set by the worker once the model is warm.
    tuned: Arc<OnceLock<Tuned>>,
}

/// The precision a model runs in, `auto`'s decision when it chose it, and what loading and
/// warming it up cost in resident memory.
#[derive(Debug, Clone)]
pub struct Tuned {
    pub precision: Precision,
    pub decision: Option<Decision>,
    pub memory_bytes: Option<u64>,
}

impl<I, O> Served<I, O> {
    /// A model served with the precision `info` names (no `auto` trial).
    pub fn new(batcher: Batcher<I, O>, info: ModelInfo, labels: Labels) -> Self {
        Self {
            batcher,
            info,
            labels,
            tuned: Default::default(),
        }
    }

    /// What the model is, with the precision it runs in once warm ("auto" before).
    pub fn info(&self) -> ModelInfo {
        let mut info = self.info.clone();
        if let Some(t) = self.tuned.get() {
            info.precision = t.precision.name().into();
        }
        info
    }

    pub fn precision_trial(&self) -> Option<Decision> {
        self.tuned.get().and_then(|t| t.decision.clone())
    }

    pub fn memory_bytes(&self) -> Option<u64> {
        self.tuned.get().and_then(|t| t.memory_bytes)
    }
}

/// Images decoded with their sizes.
pub struct Decoded {
    pub width: u32,
    pub height: u32,
}

/// How a model takes an image: whether its size can go through the model's resize (asked from
/// the header, before decoding), the pixels that resize makes, and the preparation itself.
pub(crate) struct Preparer<I> {
    check: Box<dyn Fn(i64, i64) -> Result<(), SizeError> + Send + Sync>,
    resized_pixels: Box<dyn Fn(i64, i64) -> u64 + Send + Sync>,
    /// The model's work for the image (`Engine::units`), for its expected run time.
    units: Box<dyn Fn(i64, i64) -> u64 + Send + Sync>,
    prepare: Prepare<I>,
}

/// Decoded image to model input, run on the blocking pool.
type Prepare<I> = Arc<dyn Fn(&imaging::RgbImage) -> Result<I, ModelError> + Send + Sync>;

impl<I: Send + 'static, O: Send + 'static> Served<I, O> {
    /// Reads each image's size from its header, refuses the request when its expected wait
    /// is past `deadline`, reserves the job's room in the queue, then decodes and prepares
    /// each image on the blocking pool within the decoding budget, queues them as one job and
    /// waits for the answer until `deadline`. A request refused for its size, its expected
    /// wait or a full queue costs no decoding.
    async fn infer(
        &self,
        images: Vec<ImageInput>,
        limits: &Limits,
        deadline: Instant,
        preparer: Preparer<I>,
    ) -> Result<(Vec<Decoded>, Vec<O>, Timing), ServiceError> {
        let limit = limits.max_images.min(self.batcher.config().max_queue);
        if images.len() > limit {
            return Err(ServiceError::TooManyImages {
                count: images.len(),
                limit,
            });
        }
        // Each header is read once: its cost serves admission and the decoding budget.
        let costs = images
            .iter()
            .enumerate()
            .map(|(i, b)| limits.decoding.cost(i, b, limits.max_pixels, &preparer))
            .collect::<Result<Vec<_>, _>>()?;
        let mut cost = decoding::Cost::default();
        costs.iter().for_each(|c| cost += *c);
        self.admit(images.len(), cost, &limits.decoding, deadline)?;
        let reservation = self.batcher.reserve(images.len()).map_err(submit_error)?;
        let mut sizes = Vec::with_capacity(images.len());
        let mut inputs = Vec::with_capacity(images.len());
        for ((index, image), cost) in images.into_iter().enumerate().zip(costs) {
            let (size, input) = limits
                .decoding
                .prepare(
                    index,
                    image,
                    cost.pixels,
                    limits.max_pixels,
                    deadline,
                    &preparer,
                )
                .await?;
            sizes.push(size);
            inputs.push(input);
        }
        let rx = self
            .batcher
            .enqueue(reservation, inputs, deadline)
            .map_err(submit_error)?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => Err(ServiceError::Timeout),
            Ok(Err(_)) => Err(ServiceError::Model(ModelError::Inference(
                "model worker dropped the request".into(),
            ))),
            Ok(Ok(reply)) => {
                let (outputs, timing) = reply?;
                Ok((sizes, outputs, timing))
            }
        }
    }
}

/// How much slower than measured the work ahead may turn out before an admitted request would
/// miss its deadline: runs slow down while decoding competes for the cores, and the pace
/// follows only after a few runs.
const ADMISSION_MARGIN: f64 = 1.2;

impl<I: Send + 'static, O: Send + 'static> Served<I, O> {
    /// Sheds load at admission: a job whose expected answer time (decoding the pixels queued
    /// ahead and its own, then the model's queue and its own runs, at their measured paces) is
    /// past its deadline is refused now, not answered 504 a minute later. When even an empty
    /// server could not answer it in time, that is a timeout at once; otherwise the server is
    /// overloaded, and the refusal says when the work ahead should have drained enough.
    fn admit(
        &self,
        images: usize,
        cost: decoding::Cost,
        decoding: &Decoding,
        deadline: Instant,
    ) -> Result<(), ServiceError> {
        let units = Some(cost.units);
        let Some(model) = self.batcher.expected_wait(images, units) else {
            return Ok(()); // nothing measured yet
        };
        let pixels = cost.pixels;
        let decode = decoding.expected_wait(pixels);
        let expected = model + decode;
        let budget = deadline.saturating_duration_since(Instant::now());
        if expected.mul_f64(ADMISSION_MARGIN) <= budget {
            return Ok(());
        }
        let alone = self.batcher.run_time(images, units).unwrap_or_default()
            + decoding.expected_wait_alone(pixels);
        if alone > budget {
            return Err(ServiceError::Timeout);
        }
        let late = expected.mul_f64(ADMISSION_MARGIN).saturating_sub(budget);
        let retry_after_s = late.as_secs_f64().ceil().max(1.0) as u64;
        Err(ServiceError::Overloaded {
            expected_s: expected.as_secs_f64(),
            budget_s: budget.as_secs_f64(),
            retry_after_s,
        })
    }
}

fn submit_error(e: SubmitError) -> ServiceError {
    match e {
        SubmitError::QueueFull => ServiceError::QueueFull,
        SubmitError::TooLarge { images, max_queue } => ServiceError::TooManyImages {
            count: images,
            limit: max_queue,
        },
        SubmitError::Closed => {
            ServiceError::Model(ModelError::Inference("model worker stopped".into()))
        }
    }
}

/// What every request may cost, set by the operator.
pub struct Limits {
    /// Pixels one image may declare.
    pub max_pixels: u64,
    /// Images one request may hold (fewer when the model's queue is shorter).
    pub max_images: usize,
    pub request_timeout: Duration,
    pub decoding: Decoding,
}

pub type DetectorServed = Served<engines::DetectInput, Vec<Detection>>;
pub type ClassifierServed = Served<engines::ClassifyInput, Vec<Prediction>>;

/// Everything the edge can ask of the models.
pub struct Service {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub admission: Admission,
}

/// One image's answer.
pub struct ImageResult<T> {
    pub width: u32,
    pub height: u32,
    pub output: T,
}

/// What a model answered for a request: who answered, each image's results (by the model's
/// task), and where the time went.
pub struct Answer {
    pub model: ModelInfo,
    pub results: Results,
    pub timing: Timing,
}

/// Each image's results, in the request's order.
pub enum Results {
    Detections(Vec<ImageResult<Vec<NamedDetection>>>),
    Predictions(Vec<ImageResult<Vec<NamedPrediction>>>),
}

/// Each image's size with its output, shaped by `shape`.
fn join<O, T>(
    sizes: Vec<Decoded>,
    outputs: Vec<O>,
    shape: impl Fn(&O) -> T,
) -> Vec<ImageResult<T>> {
    sizes
        .into_iter()
        .zip(outputs)
        .map(|(d, output)| ImageResult {
            width: d.width,
            height: d.height,
            output: shape(&output),
        })
        .collect()
}

impl Service {
    /// The version a request for `model` (or the task's default) goes to, when new work is
    /// admitted and it is ready. The edges ask this before reading a body, too.
    pub fn pick(&self, model: Option<&str>, task: Task) -> Result<Arc<Version>, ServiceError> {
        if self.admission.is_draining() {
            return Err(ServiceError::Draining);
        }
        self.registry.pick(model, task)
    }

    /// Every model, in the order the edges list them.
    pub fn models(&self) -> Vec<ModelState> {
        self.registry.list()
    }

    /// Every served model has finished loading and warming up.
    pub fn ready(&self) -> bool {
        self.registry.ready()
    }

    /// When a request started at `started` must be answered: the server's timeout, or the
    /// client's own when that is shorter.
    pub fn deadline(&self, started: Instant, client_timeout: Option<Duration>) -> Instant {
        let server = self.limits.request_timeout;
        let limit = client_timeout.map_or(server, |c| c.min(server));
        started + limit
    }

    /// Runs `images` through `model` (or the default model of `options`' task): the one
    /// path of every edge's inference. A model of another task is refused (`WrongTask`).
    pub async fn infer(
        &self,
        model: Option<&str>,
        images: Vec<ImageInput>,
        options: &Options,
        deadline: Instant,
    ) -> Result<Answer, ServiceError> {
        let version = self.pick(model, options.task())?;
        match (&version.model, options) {
            (Loaded::Detector { served, params }, Options::Detect(options)) => {
                let plan = options.plan(&served.labels, params)?;
                let preparer = engines::DetectInput::preparer(
                    params.resize(),
                    plan.threshold,
                    plan.mask_threshold,
                );
                let (sizes, outputs, timing) = served
                    .infer(images, &self.limits, deadline, preparer)
                    .await?;
                let info = served.info();
                let results = join(sizes, outputs, |d| plan.select(d, &served.labels, &info));
                Ok(Answer {
                    model: info,
                    results: Results::Detections(results),
                    timing,
                })
            }
            (Loaded::Classifier { served, preset }, Options::Classify(options)) => {
                let top_k = options.top_k(served.info.num_classes)?;
                let preparer = engines::ClassifyInput::preparer(*preset, top_k);
                let (sizes, outputs, timing) = served
                    .infer(images, &self.limits, deadline, preparer)
                    .await?;
                let results = join(sizes, outputs, |p| served.labels.predictions(p));
                Ok(Answer {
                    model: served.info(),
                    results: Results::Predictions(results),
                    timing,
                })
            }
            _ => Err(wrong_task(&version)),
        }
    }
}

/// What a request asks of its model, by the model's task.
#[derive(Debug, Clone)]
pub enum Options {
    Detect(DetectOptions),
    Classify(ClassifyOptions),
}

impl Options {
    pub fn task(&self) -> Task {
        match self {
            Options::Detect(_) => Task::Detect,
            Options::Classify(_) => Task::Classify,
        }
    }
}

impl From<DetectOptions> for Options {
    fn from(o: DetectOptions) -> Self {
        Options::Detect(o)
    }
}

impl From<ClassifyOptions> for Options {
    fn from(o: ClassifyOptions) -> Self {
        Options::Classify(o)
    }
}

fn wrong_task(version: &Version) -> ServiceError {
    ServiceError::WrongTask {
        name: version.settings.name.clone(),
        task: version.model.task().name(),
    }
}
