//! Reading a request's images and parameters: a raw image body, multipart file parts, or JSON
//! with base64 images; parameters from the query string, JSON fields or multipart text fields.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Uri};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use crate::service::{ClassifyOptions, DetectOptions, Options, Task};

/// Parameters of /detect, from the query string, JSON fields or multipart text fields.
#[derive(Debug, Default, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct DetectParams {
    /// The detector to ask, by name (default: the server's default detector). On
    /// `/v1/models/{name}/detect` the path names it.
    pub model: Option<String>,
    /// Lowest score kept (default: the model's `box_score_thresh`, torchvision's 0.05).
    #[param(minimum = 0.0, maximum = 1.0)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub score_threshold: Option<f64>,
    /// Most detections per image (default and maximum: the model's `box_detections_per_img`,
    /// torchvision's 100).
    #[param(minimum = 1)]
    #[schema(minimum = 1)]
    pub max_detections: Option<i64>,
    /// Class names to keep: comma-separated (or a JSON array in a body).
    #[param(value_type = Option<String>)]
    pub labels: Option<LabelList>,
    /// `png` or `jpeg`: answer with the one image of the request, detections drawn, instead
    /// of JSON.
    #[param(example = "png")]
    pub render: Option<String>,
    /// Mask models: `rle` (COCO's compressed RLE, the default), `polygon` (outer contours) or
    /// `none` (no masks; the mask head does not run).
    #[param(example = "rle")]
    pub mask_format: Option<String>,
    /// Mask models: the probability a pixel must exceed to be in the mask (default 0.5).
    #[param(minimum = 0.0, maximum = 1.0)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub mask_threshold: Option<f64>,
}

/// Parameters of /classify.
#[derive(Debug, Default, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct ClassifyParams {
    /// The classifier to ask, by name (default: the server's default classifier). On
    /// `/v1/models/{name}/classify` the path names it.
    pub model: Option<String>,
    /// How many classes to return (default 5).
    #[param(minimum = 1, maximum = 1000)]
    #[schema(minimum = 1, maximum = 1000)]
    pub top_k: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum LabelList {
    Csv(String),
    List(Vec<String>),
}

impl LabelList {
    pub fn names(&self) -> Vec<String> {
        let items: Vec<String> = match self {
            LabelList::Csv(s) => s.split(',').map(str::to_owned).collect(),
            LabelList::List(v) => v.clone(),
        };
        items
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// Parameters that can come from two places; query parameters win over body fields.
pub trait Params: DeserializeOwned + Default + Send + IntoParams {
    /// The task of the routes that read these parameters.
    const TASK: Task;

    fn or(self, other: Self) -> Self;

    /// The names the route reads (made once: every request checks against them).
    fn names() -> &'static [String];

    /// The model the parameters name.
    fn model(&self) -> Option<&String>;

    /// The model the parameters name, taken out of them.
    fn take_model(&mut self) -> Option<String>;

    /// `render`, taken out of the parameters (only detection draws).
    fn take_render(&mut self) -> Option<String> {
        None
    }

    /// What the service is asked.
    fn into_options(self) -> Options;
}

/// The API document's list of `P`'s names, so the check and the document cannot differ.
fn document_names<P: IntoParams>() -> Vec<String> {
    P::into_params(|| None)
        .into_iter()
        .map(|p| p.name)
        .collect()
}

/// The names a JSON body holds besides the parameters.
const IMAGE_FIELDS: [&str; 2] = ["image", "images"];

/// Refuses the first name the route does not read, naming the known ones and the closest:
/// a misspelt setting (`score_treshold`) would otherwise be ignored, and the answer given
/// with the default as if nothing were wrong.
fn known_only<'a>(
    given: impl IntoIterator<Item = &'a str>,
    known: &[String],
    what: &str,
) -> Result<(), ApiError> {
    let Some(unknown) = given.into_iter().find(|g| !known.iter().any(|k| k == g)) else {
        return Ok(());
    };
    // clap's threshold for "a similar argument exists".
    let closest = known
        .iter()
        .map(|k| (strsim::jaro(unknown, k), k))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!(" (did you mean {k:?}?)"))
        .unwrap_or_default();
    Err(ApiError::InvalidParameter(format!(
        "unknown {what} {unknown:?}{closest}; known: {}",
        known.join(", ")
    )))
}

/// A route's query parameters, read at extraction but refused by the handler after it has
/// picked the model (a draining server answers 503 first, whatever the query): a malformed
/// value, or a name the route does not read.
pub struct QueryParams<P>(pub Result<P, ApiError>);

impl<P: Params, S: Send + Sync> FromRequestParts<S> for QueryParams<P> {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Self(query_params(&parts.uri)))
    }
}

fn query_params<P: Params>(uri: &Uri) -> Result<P, ApiError> {
    let invalid =
        |e: axum::extract::rejection::QueryRejection| ApiError::InvalidParameter(e.body_text());
    let pairs = Query::<Vec<(String, String)>>::try_from_uri(uri).map_err(invalid)?;
    known_only(
        pairs.0.iter().map(|(name, _)| name.as_str()),
        P::names(),
        "query parameter",
    )?;
    Query::<P>::try_from_uri(uri).map(|q| q.0).map_err(invalid)
}

impl Params for DetectParams {
    const TASK: Task = Task::Detect;

    fn model(&self) -> Option<&String> {
        self.model.as_ref()
    }

    fn take_model(&mut self) -> Option<String> {
        self.model.take()
    }

    fn take_render(&mut self) -> Option<String> {
        self.render.take()
    }

    fn into_options(self) -> Options {
        DetectOptions::from(self).into()
    }

    fn names() -> &'static [String] {
        static NAMES: OnceLock<Vec<String>> = OnceLock::new();
        NAMES.get_or_init(document_names::<Self>)
    }

    fn or(self, other: Self) -> Self {
        Self {
            model: self.model.or(other.model),
            score_threshold: self.score_threshold.or(other.score_threshold),
            max_detections: self.max_detections.or(other.max_detections),
            labels: self.labels.or(other.labels),
            render: self.render.or(other.render),
            mask_format: self.mask_format.or(other.mask_format),
            mask_threshold: self.mask_threshold.or(other.mask_threshold),
        }
    }
}

impl Params for ClassifyParams {
    const TASK: Task = Task::Classify;

    fn model(&self) -> Option<&String> {
        self.model.as_ref()
    }

    fn take_model(&mut self) -> Option<String> {
        self.model.take()
    }

    fn into_options(self) -> Options {
        ClassifyOptions::from(self).into()
    }

    fn names() -> &'static [String] {
        static NAMES: OnceLock<Vec<String>> = OnceLock::new();
        NAMES.get_or_init(document_names::<Self>)
    }

    fn or(self, other: Self) -> Self {
        Self {
            model: self.model.or(other.model),
            top_k: self.top_k.or(other.top_k),
        }
    }
}

impl From<DetectParams> for DetectOptions {
    fn from(p: DetectParams) -> Self {
        Self {
            score_threshold: p.score_threshold,
            max_detections: p.max_detections,
            labels: p.labels.map(|l| l.names()),
            mask_format: p.mask_format,
            mask_threshold: p.mask_threshold,
        }
    }
}

impl From<ClassifyParams> for ClassifyOptions {
    fn from(p: ClassifyParams) -> Self {
        Self { top_k: p.top_k }
    }
}

/// An image as the whole body (the API document's name for raw bytes).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct ImageBytes(Vec<u8>);

/// A JSON request: one image or several, base64 (a `data:` URL works too), and parameters.
#[derive(Deserialize, ToSchema)]
pub struct JsonBody<P> {
    /// One image, base64.
    #[schema(
        example = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8UaHBgA0wMeAAg1MCAB4nAXgllso1AAAAAElFTkSuQmCC"
    )]
    pub image: Option<String>,
    /// Several images, base64, answered in order.
    pub images: Option<Vec<String>>,
    #[serde(flatten)]
    pub params: P,
    /// What is left after the fields above: refused (422 `invalid_parameter`), never ignored.
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: BTreeMap<String, IgnoredAny>,
}

/// A multipart request: every file part is an image (answered in order); text parts are
/// parameters. Described for the API document; parts are read by `read_multipart`.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct MultipartBody<P> {
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    #[serde(flatten)]
    pub params: P,
}

/// What reading one request body may cost.
pub struct Limits {
    /// Bytes of one body.
    pub max_body: usize,
    /// Images in one body; more are refused before any is decoded.
    pub max_images: usize,
    /// How long the whole body may take to arrive.
    pub body_timeout: Duration,
    /// Bytes of bodies being buffered at once across all requests (permits are KiB).
    pub inflight: Arc<Semaphore>,
}

/// Permits count KiB, so budgets of several GiB fit the semaphore's u32.
const BYTES_PER_PERMIT: usize = 1024;

impl Limits {
    pub fn new(
        max_body: usize,
        max_images: usize,
        body_timeout: Duration,
        max_inflight: usize,
    ) -> Self {
        let permits = max_inflight
            .div_ceil(BYTES_PER_PERMIT)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            max_body,
            max_images,
            body_timeout,
            inflight: Arc::new(Semaphore::new(permits)),
        }
    }

    /// Small limits for the fuzz targets.
    pub fn for_fuzzing() -> Self {
        Self::new(1 << 20, 8, Duration::from_secs(5), 4 << 20)
    }
}

/// A request's images and parameters, and its share of the in-flight bytes, held until the
/// request is answered.
pub struct Read<P> {
    pub images: Vec<Bytes>,
    pub params: P,
    pub held: Option<OwnedSemaphorePermit>,
}

/// Reads the body (at most `max_body` bytes, within the body timeout and the in-flight
/// budget) into images, and merges body parameters into `query`.
pub async fn read<P: Params>(
    headers: &HeaderMap,
    body: Body,
    query: P,
    limits: &Limits,
) -> Result<Read<P>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_body) {
        return Err(too_large(limits.max_body));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let known = mime.starts_with("image/")
        || matches!(
            mime.as_str(),
            "application/octet-stream" | "multipart/form-data" | "application/json"
        );
    if !known {
        return Err(ApiError::UnsupportedMediaType(format!(
            "unsupported content type {:?}: send image/*, application/octet-stream, multipart/form-data or application/json",
            if mime.is_empty() { "(none)" } else { &mime }
        )));
    }
    let (bytes, held) = collect(body, declared, limits).await?;
    let (images, params) = if mime == "multipart/form-data" {
        read_multipart(&content_type, bytes, limits.max_images).await?
    } else if mime == "application/json" {
        read_json(&bytes, limits.max_images)?
    } else {
        (vec![bytes], P::default())
    };
    if images.is_empty() {
        return Err(ApiError::BadRequest("the request holds no image".into()));
    }
    Ok(Read {
        images,
        params: query.or(params),
        held,
    })
}

fn too_large(max_body: usize) -> ApiError {
    ApiError::BodyTooLarge(format!(
        "request body is over the limit of {max_body} bytes"
    ))
}

fn permits(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(BYTES_PER_PERMIT).max(1)).unwrap_or(u32::MAX)
}

/// Room for `bytes` more in the in-flight budget, or 503: a server already buffering its
/// budget's worth of bodies turns new ones away rather than hold another 32 MiB each.
fn hold(
    limits: &Limits,
    bytes: usize,
    held: &mut Option<OwnedSemaphorePermit>,
) -> Result<(), ApiError> {
    let permit = limits
        .inflight
        .clone()
        .try_acquire_many_owned(permits(bytes))
        .map_err(|_| {
            ApiError::Busy(
                "the server is buffering as many request bytes as it may; retry shortly".into(),
            )
        })?;
    match held {
        Some(h) => h.merge(permit),
        None => *held = Some(permit),
    }
    Ok(())
}

/// The whole body, within `max_body` bytes and the body timeout. A declared length is held in
/// the in-flight budget before reading; a body of unknown length is held as it arrives.
async fn collect(
    body: Body,
    declared: Option<usize>,
    limits: &Limits,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ApiError> {
    let mut held = None;
    if let Some(n) = declared {
        hold(limits, n, &mut held)?;
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    let mut stream = body.into_data_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|_| ApiError::BadRequest("could not read the request body".into()))?;
            if buf.len() + chunk.len() > limits.max_body {
                return Err(too_large(limits.max_body));
            }
            if declared.is_none() {
                hold(limits, chunk.len(), &mut held)?;
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout(limits.body_timeout, read)
        .await
        .map_err(|_| {
            ApiError::BodyTimeout(format!(
                "the request body did not arrive within {} s",
                limits.body_timeout.as_secs_f64()
            ))
        })??;
    Ok((buf.freeze(), held))
}

fn too_many(count: usize, limit: usize) -> ApiError {
    ApiError::TooManyImages(format!(
        "the request holds {count} images; at most {limit} are taken per request"
    ))
}

async fn read_multipart<P: Params>(
    content_type: &str,
    body: Bytes,
    max_images: usize,
) -> Result<(Vec<Bytes>, P), ApiError> {
    let bad = |e: multer::Error| ApiError::BadRequest(format!("malformed multipart body: {e}"));
    let boundary = multer::parse_boundary(content_type).map_err(bad)?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut images = Vec::new();
    let mut fields = serde_json::Map::new();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let is_file = field.file_name().is_some()
            || field.content_type().is_some_and(|m| {
                m.type_() == "image" || m.essence_str() == "application/octet-stream"
            });
        let name = field.name().unwrap_or("").to_owned();
        if is_file {
            if images.len() == max_images {
                return Err(ApiError::TooManyImages(format!(
                    "the request holds more than {max_images} images; at most {max_images} are taken per request"
                )));
            }
            images.push(field.bytes().await.map_err(bad)?);
        } else {
            let text = field.text().await.map_err(bad)?;
            let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            fields.insert(name, value);
        }
    }
    known_only(fields.keys().map(String::as_str), P::names(), "field")?;
    let params = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| ApiError::InvalidParameter(format!("invalid parameter: {e}")))?;
    Ok((images, params))
}

fn read_json<P: Params>(bytes: &[u8], max_images: usize) -> Result<(Vec<Bytes>, P), ApiError> {
    let body: JsonBody<P> = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_data() {
            ApiError::InvalidParameter(format!("invalid JSON field: {e}"))
        } else {
            ApiError::BadRequest(format!("invalid JSON: {e}"))
        }
    })?;
    // Only names neither the image fields nor the parameters took are left in `unknown`.
    if !body.unknown.is_empty() {
        let known: Vec<String> = P::names()
            .iter()
            .cloned()
            .chain(IMAGE_FIELDS.map(str::to_owned))
            .collect();
        known_only(body.unknown.keys().map(String::as_str), &known, "field")?;
    }
    let encoded: Vec<String> = body
        .image
        .into_iter()
        .chain(body.images.unwrap_or_default())
        .collect();
    if encoded.len() > max_images {
        return Err(too_many(encoded.len(), max_images));
    }
    let images = encoded
        .iter()
        .enumerate()
        .map(|(i, s)| {
            decode_base64(s)
                .map_err(|e| ApiError::BadRequest(format!("image {i}: invalid base64: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok((images, body.params))
}

/// Standard base64, with or without padding, optionally as a `data:` URL.
fn decode_base64(s: &str) -> Result<Bytes, base64::DecodeError> {
    let payload = match s.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => s,
    };
    let cleaned: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(cleaned).map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_accepts_data_urls_and_missing_padding() {
        assert_eq!(
            decode_base64("data:image/png;base64,aGk=").unwrap(),
            Bytes::from_static(b"hi")
        );
        assert_eq!(decode_base64("aGk").unwrap(), Bytes::from_static(b"hi"));
        assert!(decode_base64("***").is_err());
    }

    #[test]
    fn label_lists_accept_csv_and_arrays() {
        assert_eq!(
            LabelList::Csv("cat, dog,".into()).names(),
            vec!["cat", "dog"]
        );
        assert_eq!(LabelList::List(vec!["car".into()]).names(), vec!["car"]);
    }
}
