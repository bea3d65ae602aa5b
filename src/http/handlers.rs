//! Route handlers: check, read, ask the service, shape the JSON.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::input::{self, RawParams};
use super::{AppState, SERVER_TIMING};
use crate::api::{detections_json, predictions_json, DetectionJson};
use crate::batch::Timing;
use crate::labels::Labels;
use crate::model::detector::MAX_DETECTIONS;
use crate::model::Detection;
use crate::render;
use crate::service::{ImageResult, Service, ServiceError};

const DEFAULT_SCORE_THRESHOLD: f64 = 0.05;
const DEFAULT_TOP_K: i64 = 5;
const MAX_TOP_K: i64 = 1000;

fn query_params(query: Result<Query<RawParams>, QueryRejection>) -> Result<RawParams, ApiError> {
    query
        .map(|q| q.0)
        .map_err(|e| ApiError::InvalidParameter(e.body_text()))
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    v: Option<T>,
    default: T,
    lo: T,
    hi: T,
) -> Result<T, ApiError> {
    let v = v.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        return Err(ApiError::InvalidParameter(format!(
            "{name} must be within {lo}..={hi}, got {v}"
        )));
    }
    Ok(v)
}

/// The label ids a `labels` parameter keeps; every name must exist.
fn label_filter(params: &RawParams, labels: &Labels) -> Result<Option<HashSet<i64>>, ApiError> {
    let Some(list) = &params.labels else {
        return Ok(None);
    };
    let mut ids = HashSet::new();
    let mut unknown = Vec::new();
    for name in list.names() {
        let found: Vec<i64> = (0..labels.len() as i64)
            .filter(|&i| labels.name(i) == name)
            .collect();
        if found.is_empty() {
            unknown.push(name);
        }
        ids.extend(found);
    }
    if !unknown.is_empty() {
        return Err(ApiError::InvalidParameter(format!(
            "unknown labels: {}",
            unknown.join(", ")
        )));
    }
    Ok(Some(ids))
}

fn with_timing(body: Value, timing: Timing) -> Response {
    timed(Json(body).into_response(), timing)
}

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
fn render_format(params: &RawParams, images: usize) -> Result<Option<render::Format>, ApiError> {
    let Some(value) = &params.render else {
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

/// Decodes the image again and draws on it, on the blocking pool: decoding costs milliseconds
/// against the seconds of inference, and keeps the pixels out of the queue.
async fn rendered(
    image: bytes::Bytes,
    max_pixels: u64,
    detections: Vec<DetectionJson>,
    format: render::Format,
) -> Result<Response, ApiError> {
    let encoded = tokio::task::spawn_blocking(move || {
        render::annotate(&image, max_pixels, &detections, format)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("render task failed: {e}")))?
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, format.content_type())], encoded).into_response())
}

/// New work is refused while draining; then the model must be loaded and ready, which is
/// judged before the body is read.
fn accept<'s, M>(
    state: &'s AppState,
    model: impl FnOnce(&'s Service) -> Result<M, ServiceError>,
) -> Result<M, ApiError> {
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    Ok(model(&state.service)?)
}

async fn read_body(
    state: &AppState,
    query: Result<Query<RawParams>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<bytes::Bytes>, RawParams), ApiError> {
    input::read(headers, body, query_params(query)?, state.max_body_bytes).await
}

pub async fn detect(
    State(state): State<Arc<AppState>>,
    query: Result<Query<RawParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let served = accept(&state, |s| s.detector())?;
    let (images, params) = read_body(&state, query, &headers, body).await?;
    let threshold = in_range(
        "score_threshold",
        params.score_threshold,
        DEFAULT_SCORE_THRESHOLD,
        0.0,
        1.0,
    )?;
    let max_detections = in_range(
        "max_detections",
        params.max_detections,
        MAX_DETECTIONS,
        1,
        MAX_DETECTIONS,
    )? as usize;
    let keep = label_filter(&params, &served.labels)?;
    let render = render_format(&params, images.len())?;
    // Bytes clones share the buffer; kept only when the image is to be drawn.
    let source = render.and_then(|f| Some((f, images.first()?.clone())));
    let answer = state.service.detect(images, threshold, started).await?;
    let shown = |r: &ImageResult<Vec<Detection>>| {
        shown_detections(&r.output, keep.as_ref(), max_detections, &served.labels)
    };
    if let Some((format, image)) = source {
        // render_format has checked there is exactly one result.
        let detections = answer.results.first().map(shown).unwrap_or_default();
        let max_pixels = state.service.max_pixels;
        let response = rendered(image, max_pixels, detections, format).await?;
        return Ok(timed(response, answer.timing));
    }
    let results: Vec<Value> = answer
        .results
        .iter()
        .map(|r| json!({"width": r.width, "height": r.height, "detections": shown(r)}))
        .collect();
    Ok(with_timing(
        json!({"model": served.info, "results": results}),
        answer.timing,
    ))
}

/// The detections a request asked for: its labels only, at most `max` of them.
fn shown_detections(
    output: &[Detection],
    keep: Option<&HashSet<i64>>,
    max: usize,
    labels: &Labels,
) -> Vec<DetectionJson> {
    let kept: Vec<Detection> = output
        .iter()
        .filter(|d| keep.is_none_or(|k| k.contains(&d.label)))
        .take(max)
        .cloned()
        .collect();
    detections_json(&kept, labels)
}

pub async fn classify(
    State(state): State<Arc<AppState>>,
    query: Result<Query<RawParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let served = accept(&state, |s| s.classifier())?;
    let (images, params) = read_body(&state, query, &headers, body).await?;
    let top_k = in_range("top_k", params.top_k, DEFAULT_TOP_K, 1, MAX_TOP_K)?
        .min(served.info.num_classes) as usize;
    let answer = state.service.classify(images, top_k, started).await?;
    let results: Vec<Value> = answer
        .results
        .iter()
        .map(|r| json!({"width": r.width, "height": r.height, "predictions": predictions_json(&r.output, &served.labels)}))
        .collect();
    Ok(with_timing(
        json!({"model": served.info, "results": results}),
        answer.timing,
    ))
}

pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let s = &state.service;
    let mut models = Vec::new();
    if let Some(d) = &s.detector {
        models.push((
            d.info.clone(),
            "/detect",
            d.batcher.is_ready(),
            d.batcher.config(),
        ));
    }
    if let Some(c) = &s.classifier {
        models.push((
            c.info.clone(),
            "/classify",
            c.batcher.is_ready(),
            c.batcher.config(),
        ));
    }
    let models: Vec<Value> = models
        .into_iter()
        .map(|(info, endpoint, ready, b)| {
            json!({
                "name": info.name, "endpoint": endpoint, "arch": info.arch, "classes": info.num_classes,
                "device": info.device, "precision": info.precision, "ready": ready,
                "batching": {"max_batch_size": b.max_batch_size, "max_batch_delay_ms": b.max_batch_delay.as_millis() as u64, "max_queue": b.max_queue},
            })
        })
        .collect();
    Json(json!({"models": models}))
}

/// The demo page: static HTML that calls /detect and /classify like any other client.
pub async fn page() -> Html<&'static str> {
    Html(include_str!("page/index.html"))
}

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    if state.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
    } else if state.service.ready() {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
    }
}

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
