//! Reading a request's images and parameters: a raw image body, multipart file parts, or JSON
//! with base64 images; parameters from the query string, JSON fields or multipart text fields.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use base64::Engine as _;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use crate::service::{ClassifyOptions, DetectOptions};

/// Parameters of /detect, from the query string, JSON fields or multipart text fields.
#[derive(Debug, Default, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct DetectParams {
    /// Lowest score kept (default 0.05).
    #[param(minimum = 0.0, maximum = 1.0)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub score_threshold: Option<f64>,
    /// Most detections per image (default and maximum 100).
    #[param(minimum = 1, maximum = 100)]
    #[schema(minimum = 1, maximum = 100)]
    pub max_detections: Option<i64>,
    /// Class names to keep: comma-separated (or a JSON array in a body).
    #[param(value_type = Option<String>)]
    pub labels: Option<LabelList>,
    /// `png` or `jpeg`: answer with the one image of the request, detections drawn, instead
    /// of JSON.
    #[param(example = "png")]
    pub render: Option<String>,
}

/// Parameters of /classify.
#[derive(Debug, Default, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct ClassifyParams {
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
pub trait Params: DeserializeOwned + Default + Send {
    fn or(self, other: Self) -> Self;
}

impl Params for DetectParams {
    fn or(self, other: Self) -> Self {
        Self {
            score_threshold: self.score_threshold.or(other.score_threshold),
            max_detections: self.max_detections.or(other.max_detections),
            labels: self.labels.or(other.labels),
            render: self.render.or(other.render),
        }
    }
}

impl Params for ClassifyParams {
    fn or(self, other: Self) -> Self {
        Self {
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

/// Reads the body (at most `max_body` bytes) into images, and merges body parameters into
/// `query`.
pub async fn read<P: Params>(
    headers: &HeaderMap,
    body: Body,
    query: P,
    max_body: usize,
) -> Result<(Vec<Bytes>, P), ApiError> {
    let too_large = || {
        ApiError::BodyTooLarge(format!(
            "request body is over the limit of {max_body} bytes"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(too_large());
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
    let bytes = axum::body::to_bytes(body, max_body).await.map_err(|e| {
        if e.into_inner().is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            ApiError::BadRequest("could not read the request body".into())
        }
    })?;
    let (images, params) = if mime.starts_with("image/") || mime == "application/octet-stream" {
        (vec![bytes], P::default())
    } else if mime == "multipart/form-data" {
        read_multipart(&content_type, bytes).await?
    } else if mime == "application/json" {
        read_json(&bytes)?
    } else {
        return Err(ApiError::UnsupportedMediaType(format!(
            "unsupported content type {:?}: send image/*, application/octet-stream, multipart/form-data or application/json",
            if mime.is_empty() { "(none)" } else { &mime }
        )));
    };
    if images.is_empty() {
        return Err(ApiError::BadRequest("the request holds no image".into()));
    }
    Ok((images, query.or(params)))
}

async fn read_multipart<P: Params>(
    content_type: &str,
    body: Bytes,
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
            images.push(field.bytes().await.map_err(bad)?);
        } else {
            let text = field.text().await.map_err(bad)?;
            let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            fields.insert(name, value);
        }
    }
    let params = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| ApiError::InvalidParameter(format!("invalid parameter: {e}")))?;
    Ok((images, params))
}

fn read_json<P: Params>(bytes: &[u8]) -> Result<(Vec<Bytes>, P), ApiError> {
    let body: JsonBody<P> = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_data() {
            ApiError::InvalidParameter(format!("invalid JSON field: {e}"))
        } else {
            ApiError::BadRequest(format!("invalid JSON: {e}"))
        }
    })?;
    let encoded: Vec<String> = body
        .image
        .into_iter()
        .chain(body.images.unwrap_or_default())
        .collect();
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
