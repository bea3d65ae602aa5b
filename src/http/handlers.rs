//! Route handlers: check, read, ask the service, shape the JSON. Each handler's
//! `#[utoipa::path]` is the API document's entry for its route.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;

use super::error::{ApiError, ModelErrors};
use super::input::{
    self, ClassifyParams, DetectParams, ImageBytes, JsonBody, MultipartBody, Params, QueryParams,
};
use super::{AppState, SERVER_TIMING};
use crate::api::{
    detections_json, predictions_json, BatchingJson, ClassifyResponse, DetectResponse,
    ImageDetections, ImagePredictions, ModelStatus, ModelsResponse, NextVersionJson, StatusBody,
};

use crate::labels::NamedDetection;
use crate::model::Named;
use crate::render;
use crate::service::{
    Answer, ImageInput, ImageResult, ModelInfo, ModelState, Results, Task, Timing,
};

fn timed(mut response: Response, timing: Timing) -> Response {
    let value = format!(
        "queue;dur={:.1}, inference;dur={:.1}",
        timing.queue.as_secs_f64() * 1000.0,
        timing.inference.as_secs_f64() * 1000.0
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(SERVER_TIMING, v);
    }
    response
}

/// `render=png|jpeg` asks for the one image drawn instead of JSON.
fn render_format(value: Option<&str>, images: usize) -> Result<Option<render::Format>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let format = render::Format::parse(value).ok_or_else(|| {
        ApiError::InvalidParameter(format!("render must be png or jpeg, got {value:?}"))
    })?;
    if images != 1 {
        return Err(ApiError::InvalidParameter(format!(
            "render draws exactly one image; this request holds {images}"
        )));
    }
    Ok(Some(format))
}

/// Decodes the image again and draws on it, on the blocking pool within the decoding budget:
/// decoding costs milliseconds against the seconds of inference, and keeps the pixels out of
/// the queue.
async fn rendered(
    state: &AppState,
    image: bytes::Bytes,
    pixels: u64,
    deadline: Instant,
    detections: Vec<NamedDetection>,
    format: render::Format,
) -> Result<Response, ApiError> {
    let limits = &state.service.limits;
    let max_pixels = limits.max_pixels;
    let encoded = limits
        .decoding
        .run(pixels, deadline, move || {
            render::annotate(&image, max_pixels, &detections, format)
        })
        .await?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, format.content_type())], encoded).into_response())
}

async fn read_body<P: Params>(
    state: &AppState,
    query: QueryParams<P>,
    headers: &HeaderMap,
    body: Body,
) -> Result<input::Read<P>, ApiError> {
    input::read(headers, body, query.0?, &state.input).await
}

/// Detect objects in one image or several.
///
/// The body is one image (any image/* type or application/octet-stream), a multipart form
/// whose file parts are images, or JSON with base64 images. Parameters come from the query
/// string or, for multipart and JSON, from fields of the body (the query wins). A name not
/// listed here, in any of those places, is refused (422 `invalid_parameter`, naming the known
/// ones), never ignored.
#[utoipa::path(
    post, path = "/detect", tag = "models",
    params(DetectParams),
    request_body(content(
        (ImageBytes = "image/jpeg"), (ImageBytes = "image/png"), (ImageBytes = "image/webp"),
        (ImageBytes = "application/octet-stream"),
        (MultipartBody<DetectParams> = "multipart/form-data"),
        (JsonBody<DetectParams> = "application/json"),
    )),
    responses(
        (status = 200, description = "Detections per image, or with `render` the image drawn",
         content((DetectResponse = "application/json"), (ImageBytes = "image/png"), (ImageBytes = "image/jpeg"))),
        ModelErrors,
    ),
    security((), ("api_key" = [])),
)]
pub async fn detect(
    State(state): State<Arc<AppState>>,
    query: QueryParams<DetectParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer_with(state, None, query, headers, body).await
}

/// Detect objects with the detector of that name.
///
/// As `/detect`, for one model by name.
#[utoipa::path(
    post, path = "/v1/models/{name}/detect", tag = "models",
    params(("name" = String, Path, description = "The model's name"), DetectParams),
    request_body(content(
        (ImageBytes = "image/jpeg"), (ImageBytes = "image/png"), (ImageBytes = "image/webp"),
        (ImageBytes = "application/octet-stream"),
        (MultipartBody<DetectParams> = "multipart/form-data"),
        (JsonBody<DetectParams> = "application/json"),
    )),
    responses(
        (status = 200, description = "Detections per image, or with `render` the image drawn",
         content((DetectResponse = "application/json"), (ImageBytes = "image/png"), (ImageBytes = "image/jpeg"))),
        ModelErrors,
    ),
    security((), ("api_key" = [])),
)]
pub async fn detect_named(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    query: QueryParams<DetectParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer_with(state, Some(name), query, headers, body).await
}

/// Every inference route: the model is checked before the body is read (draining, an unknown
/// or a loading model cost no upload), the body read within its limits, the service asked,
/// and its answer shaped as JSON or, with `render`, drawn.
async fn infer_with<P: Params>(
    state: Arc<AppState>,
    path: Option<String>,
    query: QueryParams<P>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    // The path's model, else the query string's.
    let named = path.or_else(|| query.0.as_ref().ok().and_then(|q| q.model().cloned()));
    state.service.pick(named.as_deref(), P::TASK)?;
    // `_held` keeps the body's share of the in-flight bytes until the answer is sent.
    let input::Read {
        images,
        mut params,
        held: _held,
    } = read_body(&state, query, &headers, body).await?;
    let model = named.or(params.take_model());
    let render = render_format(params.take_render().as_deref(), images.len())?;
    // Bytes clones share the buffer; kept only when the image is to be drawn.
    let source = render.and_then(|f| Some((f, images.first()?.clone())));
    let deadline = state.service.deadline(started, client_timeout(&headers)?);
    let images = images.into_iter().map(ImageInput::Encoded).collect();
    let options = params.into_options();
    let Answer {
        model,
        results,
        timing,
    } = state
        .service
        .infer(model.as_deref(), images, &options, deadline)
        .await?;
    let response = match (results, source) {
        (Results::Detections(results), Some((format, image))) => {
            // render_format has checked there is exactly one result.
            let Some(result) = results.into_iter().next() else {
                return Err(ApiError::Internal("no result for the image".into()));
            };
            let pixels = u64::from(result.width) * u64::from(result.height);
            rendered(&state, image, pixels, deadline, result.output, format).await?
        }
        (results, _) => answer_json(model, results),
    };
    Ok(timed(response, timing))
}

/// An answer as `/detect`'s or `/classify`'s JSON.
fn answer_json(model: ModelInfo, results: Results) -> Response {
    match results {
        Results::Detections(results) => {
            let results = per_image(results, |width, height, d| ImageDetections {
                width,
                height,
                detections: detections_json(d),
            });
            Json(DetectResponse { model, results }).into_response()
        }
        Results::Predictions(results) => {
            let results = per_image(results, |width, height, p| ImagePredictions {
                width,
                height,
                predictions: predictions_json(p),
            });
            Json(ClassifyResponse { model, results }).into_response()
        }
    }
}

/// Each image's size and output, shaped by `shape`.
fn per_image<T, J>(results: Vec<ImageResult<T>>, shape: impl Fn(u32, u32, T) -> J) -> Vec<J> {
    results
        .into_iter()
        .map(|r| shape(r.width, r.height, r.output))
        .collect()
}

/// Classify one image or several (ImageNet classes for the published weights).
///
/// Bodies and parameters as for /detect.
#[utoipa::path(
    post, path = "/classify", tag = "models",
    params(ClassifyParams),
    request_body(content(
        (ImageBytes = "image/jpeg"), (ImageBytes = "image/png"), (ImageBytes = "image/webp"),
        (ImageBytes = "application/octet-stream"),
        (MultipartBody<ClassifyParams> = "multipart/form-data"),
        (JsonBody<ClassifyParams> = "application/json"),
    )),
    responses((status = 200, description = "Top classes per image", body = ClassifyResponse), ModelErrors),
    security((), ("api_key" = [])),
)]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    query: QueryParams<ClassifyParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer_with(state, None, query, headers, body).await
}

/// Classify with the classifier of that name.
///
/// As `/classify`, for one model by name.
#[utoipa::path(
    post, path = "/v1/models/{name}/classify", tag = "models",
    params(("name" = String, Path, description = "The model's name"), ClassifyParams),
    request_body(content(
        (ImageBytes = "image/jpeg"), (ImageBytes = "image/png"), (ImageBytes = "image/webp"),
        (ImageBytes = "application/octet-stream"),
        (MultipartBody<ClassifyParams> = "multipart/form-data"),
        (JsonBody<ClassifyParams> = "application/json"),
    )),
    responses((status = 200, description = "Top classes per image", body = ClassifyResponse), ModelErrors),
    security((), ("api_key" = [])),
)]
pub async fn classify_named(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    query: QueryParams<ClassifyParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer_with(state, Some(name), query, headers, body).await
}

/// The models this server holds, whether they are ready, and their batching settings.
#[utoipa::path(
    get, path = "/v1/models", tag = "models",
    responses(
        (status = 200, description = "Loaded models", body = ModelsResponse),
        (status = 401, description = "Missing or invalid API key", body = crate::api::ErrorBody),
    ),
    security((), ("api_key" = [])),
)]
pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelsResponse> {
    let models = state
        .service
        .models()
        .into_iter()
        .map(model_status)
        .collect();
    Json(ModelsResponse { models })
}

pub(super) fn model_status(m: ModelState) -> ModelStatus {
    let endpoint = m.task.map(|t| match t {
        Task::Detect => format!("/v1/models/{}/detect", m.name),
        Task::Classify => format!("/v1/models/{}/classify", m.name),
    });
    let b = m.batching;
    let info = m.info.as_ref();
    let keypoints = m.keypoints();
    ModelStatus {
        name: m.name.clone(),
        version: m.version,
        task: m.task.map(|t| t.name().into()),
        state: m.state,
        error: m.error().map(str::to_owned),
        default: m.default,
        endpoint,
        arch: info.map(|i| i.arch.clone()),
        outputs: m.outputs(),
        keypoint_names: keypoints.map(|k| k.names.clone()),
        skeleton: keypoints.map(|k| k.skeleton.clone()),
        classes: info.map(|i| i.num_classes),
        device: info.map(|i| i.device.clone()),
        precision: info.map(|i| i.precision.clone()),
        precision_trial: m.precision_trial.clone().map(Into::into),
        ready: m.ready(),
        memory_mb: m.memory_mib(),
        settings: (&m.settings).into(),
        batching: BatchingJson {
            max_batch_size: b.max_batch_size,
            max_batch_delay_ms: b.max_batch_delay.as_millis() as u64,
            max_queue: b.max_queue,
        },
        next: m.pending.as_ref().map(|p| NextVersionJson {
            version: p.version,
            state: p.state,
            error: p.error.clone(),
        }),
        draining: m.draining.clone(),
    }
}

fn status(s: &str) -> Json<StatusBody> {
    Json(StatusBody { status: s.into() })
}

/// The demo page: static HTML that calls /detect and /classify like any other client.
#[utoipa::path(get, path = "/", tag = "operations", responses(
    (status = 200, description = "A self-contained page to try the models", body = String, content_type = "text/html"),
))]
pub async fn page() -> Html<&'static str> {
    Html(include_str!("page/index.html"))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = StatusBody)))]
pub async fn healthz() -> Json<StatusBody> {
    status("ok")
}

/// Readiness: every model loaded and warmed up, and not draining.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready", body = StatusBody),
    (status = 503, description = "Loading or draining", body = StatusBody),
))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<StatusBody>) {
    if state.service.admission.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, status("draining"))
    } else if state.service.ready() {
        (StatusCode::OK, status("ready"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, status("loading"))
    }
}

/// Prometheus metrics (the detectd_* series).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.service.metrics.render(),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// The header in which a client gives its own deadline in milliseconds (the shorter of it and
/// `--request-timeout-ms` applies, as gRPC's `grpc-timeout` does).
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

fn client_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(|ms| Some(Duration::from_millis(ms)))
        .ok_or_else(|| {
            ApiError::InvalidParameter(format!(
                "{TIMEOUT_HEADER}: {value:?} is not a positive number of milliseconds"
            ))
        })
}
