//! Reading a request's images and parameters: a raw image body, multipart file parts, or JSON
//! with base64 images; parameters from the query string, JSON fields or multipart text fields.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use super::error::ApiError;

/// Parameters as sent; `Params::validate` checks them.
#[derive(Debug, Default, Deserialize)]
pub struct RawParams {
    pub score_threshold: Option<f64>,
    pub max_detections: Option<i64>,
    pub labels: Option<LabelList>,
    pub top_k: Option<i64>,
    /// `png` or `jpeg`: answer /detect with the image drawn instead of JSON.
    pub render: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
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

impl RawParams {
    /// Fills what `self` lacks from `other` (query parameters win over body fields).
    fn or(self, other: RawParams) -> RawParams {
        RawParams {
            score_threshold: self.score_threshold.or(other.score_threshold),
            max_detections: self.max_detections.or(other.max_detections),
            labels: self.labels.or(other.labels),
            top_k: self.top_k.or(other.top_k),
            render: self.render.or(other.render),
        }
    }
}

#[derive(Deserialize)]
struct JsonBody {
    image: Option<String>,
    images: Option<Vec<String>>,
    #[serde(flatten)]
    params: RawParams,
}

/// Reads the body (at most `max_body` bytes) into images, and merges body parameters into
/// `query`.
pub async fn read(
    headers: &HeaderMap,
    body: Body,
    query: RawParams,
    max_body: usize,
) -> Result<(Vec<Bytes>, RawParams), ApiError> {
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
        (vec![bytes], RawParams::default())
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

async fn read_multipart(
    content_type: &str,
    body: Bytes,
) -> Result<(Vec<Bytes>, RawParams), ApiError> {
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

fn read_json(bytes: &[u8]) -> Result<(Vec<Bytes>, RawParams), ApiError> {
    let body: JsonBody = serde_json::from_slice(bytes).map_err(|e| {
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
