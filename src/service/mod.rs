//! The serving core between the HTTP edge and the models: decodes and preprocesses images off
//! the async threads, queues them for the model's worker, and waits with a deadline. The edge
//! hands in bytes and gets plain results back; no tensor crosses it.

mod admission;
mod engines;
mod params;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::{DetectionJson, PredictionJson};
use crate::batch::{Batcher, SubmitError, Timing};
use crate::imaging::{self, ImageError};
use crate::labels::Labels;
use crate::metrics::Metrics;
use crate::model::{Detection, ModelError, Prediction, Preset};

pub use admission::{Admission, InFlight};
pub use engines::{start_classifier, start_detector, ClassifierSpec, DetectorSpec};
pub use params::{
    ClassifyOptions, DetectOptions, DEFAULT_SCORE_THRESHOLD, DEFAULT_TOP_K, MAX_TOP_K,
};

/// What the edge reports about a loaded model.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelInfo {
    pub name: String,
    pub arch: String,
    pub device: String,
    pub precision: String,
    pub num_classes: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("image {index}: {source}")]
    Image { index: usize, source: ImageError },
    #[error("the {0} model is not loaded on this server")]
    NotLoaded(&'static str),
    #[error("the {0} model is still loading")]
    NotReady(&'static str),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("the server is shutting down")]
    Draining,
    #[error("the queue is full")]
    QueueFull,
    #[error("the request timed out")]
    Timeout,
    #[error("{0}")]
    Model(#[from] ModelError),
}

/// One model behind its queue, with what preparing its inputs needs.
pub struct Served<I, O> {
    pub batcher: Batcher<I, O>,
    pub info: ModelInfo,
    pub labels: Labels,
}

/// Images decoded with their sizes.
pub struct Decoded {
    pub width: u32,
    pub height: u32,
}

impl<I: Send + 'static, O: Send + 'static> Served<I, O> {
    /// Decodes and prepares every image on the blocking pool, queues them as one job and
    /// waits for the answer until `deadline`.
    async fn infer(
        &self,
        images: Vec<bytes::Bytes>,
        max_pixels: u64,
        deadline: Instant,
        prepare: impl Fn(&imaging::RgbImage) -> I + Send + Sync + 'static,
    ) -> Result<(Vec<Decoded>, Vec<O>, Timing), ServiceError> {
        let prepared =
            tokio::task::spawn_blocking(move || decode_all(&images, max_pixels, &prepare))
                .await
                .map_err(|e| ModelError::Inference(format!("preprocessing task failed: {e}")))??;
        let (sizes, inputs): (Vec<Decoded>, Vec<I>) = prepared.into_iter().unzip();
        let rx = self.batcher.submit(inputs, deadline).map_err(|e| match e {
            SubmitError::QueueFull => ServiceError::QueueFull,
            SubmitError::Closed => {
                ServiceError::Model(ModelError::Inference("model worker stopped".into()))
            }
        })?;
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

fn decode_all<I>(
    images: &[bytes::Bytes],
    max_pixels: u64,
    prepare: &impl Fn(&imaging::RgbImage) -> I,
) -> Result<Vec<(Decoded, I)>, ServiceError> {
    images
        .iter()
        .enumerate()
        .map(|(index, bytes)| {
            let img = imaging::decode(bytes, max_pixels)
                .map_err(|source| ServiceError::Image { index, source })?;
            Ok((
                Decoded {
                    width: img.width,
                    height: img.height,
                },
                prepare(&img),
            ))
        })
        .collect()
}

pub type DetectorServed = Served<engines::DetectInput, Vec<Detection>>;
pub type ClassifierServed = Served<engines::ClassifyInput, Vec<Prediction>>;

/// Everything the edge can ask of the models.
pub struct Service {
    pub detector: Option<DetectorServed>,
    pub classifier: Option<ClassifierServed>,
    pub classifier_preset: Preset,
    pub metrics: Arc<Metrics>,
    pub max_pixels: u64,
    pub request_timeout: Duration,
    pub admission: Admission,
}

/// One image's answer.
pub struct ImageResult<T> {
    pub width: u32,
    pub height: u32,
    pub output: T,
}

pub struct Answer<T> {
    pub model: ModelInfo,
    pub results: Vec<ImageResult<T>>,
    pub timing: Timing,
}

fn join<O, T>(
    model: &ModelInfo,
    sizes: Vec<Decoded>,
    outputs: Vec<O>,
    timing: Timing,
    shape: impl Fn(&O) -> T,
) -> Answer<T> {
    let results = sizes
        .into_iter()
        .zip(outputs)
        .map(|(d, output)| ImageResult {
            width: d.width,
            height: d.height,
            output: shape(&output),
        })
        .collect();
    Answer {
        model: model.clone(),
        results,
        timing,
    }
}

impl Service {
    /// The detector, when new work is admitted and it is loaded and ready.
    pub fn detector(&self) -> Result<&DetectorServed, ServiceError> {
        if self.admission.is_draining() {
            return Err(ServiceError::Draining);
        }
        let d = self
            .detector
            .as_ref()
            .ok_or(ServiceError::NotLoaded("detector"))?;
        if d.batcher.is_ready() {
            Ok(d)
        } else {
            Err(ServiceError::NotReady("detector"))
        }
    }

    pub fn classifier(&self) -> Result<&ClassifierServed, ServiceError> {
        if self.admission.is_draining() {
            return Err(ServiceError::Draining);
        }
        let c = self
            .classifier
            .as_ref()
            .ok_or(ServiceError::NotLoaded("classifier"))?;
        if c.batcher.is_ready() {
            Ok(c)
        } else {
            Err(ServiceError::NotReady("classifier"))
        }
    }

    /// Every loaded model has finished loading and warming up.
    pub fn ready(&self) -> bool {
        self.detector.as_ref().is_none_or(|d| d.batcher.is_ready())
            && self
                .classifier
                .as_ref()
                .is_none_or(|c| c.batcher.is_ready())
    }

    /// When a request started at `started` must be answered: the server's timeout, or the
    /// client's own when that is shorter.
    pub fn deadline(&self, started: Instant, client_timeout: Option<Duration>) -> Instant {
        let limit = client_timeout.map_or(self.request_timeout, |c| c.min(self.request_timeout));
        started + limit
    }

    pub async fn detect(
        &self,
        images: Vec<bytes::Bytes>,
        options: &DetectOptions,
        deadline: Instant,
    ) -> Result<Answer<Vec<DetectionJson>>, ServiceError> {
        let served = self.detector()?;
        let plan = options.plan(&served.labels)?;
        let threshold = plan.threshold;
        let prepare = move |img: &imaging::RgbImage| engines::DetectInput::new(img, threshold);
        let (sizes, outputs, timing) = served
            .infer(images, self.max_pixels, deadline, prepare)
            .await?;
        Ok(join(&served.info, sizes, outputs, timing, |d| {
            plan.select(d, &served.labels)
        }))
    }

    pub async fn classify(
        &self,
        images: Vec<bytes::Bytes>,
        options: &ClassifyOptions,
        deadline: Instant,
    ) -> Result<Answer<Vec<PredictionJson>>, ServiceError> {
        let served = self.classifier()?;
        let top_k = options.top_k(served.info.num_classes)?;
        let preset = self.classifier_preset;
        let prepare =
            move |img: &imaging::RgbImage| engines::ClassifyInput::new(img, preset, top_k);
        let (sizes, outputs, timing) = served
            .infer(images, self.max_pixels, deadline, prepare)
            .await?;
        Ok(join(&served.info, sizes, outputs, timing, |p| {
            crate::api::predictions_json(p, &served.labels)
        }))
    }
}
