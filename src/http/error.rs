//! The edge's one error type and its status table. Client errors say what was wrong; internal
//! ones say nothing beyond "internal error" and are logged with the request id.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};

use crate::imaging::ImageError;
use crate::service::ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidImage(String),
    #[error("{0}")]
    BodyTooLarge(String),
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("{0}")]
    TooManyImages(String),
    #[error("{0}")]
    UnusableImage(String),
    #[error("{0}")]
    BodyTimeout(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    ModelNotLoaded(String),
    #[error("{0}")]
    ModelNotFound(String),
    /// An admin load whose weights or settings did not work.
    #[error("{0}")]
    LoadFailed(String),
    /// An admin load refused by --max-memory-mb.
    #[error("{0}")]
    InsufficientMemory(String),
    /// An admin load at odds with what the server holds (a name changing task).
    #[error("{0}")]
    Conflict(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("the queue is full; retry shortly")]
    QueueFull,
    /// The expected wait is past the deadline: refused before decoding.
    #[error("{message}")]
    Overloaded { message: String, retry_after_s: u64 },
    #[error("{0}")]
    NotReady(String),
    #[error("the server is shutting down")]
    Draining,
    #[error("the request timed out")]
    Timeout,
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The status table.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidImage(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge(_) | ApiError::ImageTooLarge(_) | ApiError::TooManyImages(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::UnusableImage(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidParameter(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) | ApiError::ModelNotLoaded(_) | ApiError::ModelNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::LoadFailed(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::InsufficientMemory(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady(_)
            | ApiError::Draining
            | ApiError::Busy(_)
            | ApiError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON every refusal answers with: `{error, code}`.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": self.to_string(), "code": self.code()})
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidImage(_) => "invalid_image",
            ApiError::BodyTooLarge(_) => "body_too_large",
            ApiError::ImageTooLarge(_) => "image_too_large",
            ApiError::TooManyImages(_) => "too_many_images",
            ApiError::UnusableImage(_) => "unusable_image",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::Busy(_) => "busy",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::InvalidParameter(_) => "invalid_parameter",
            ApiError::NotFound(_) => "not_found",
            ApiError::ModelNotLoaded(_) => "model_not_loaded",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::LoadFailed(_) => "load_failed",
            ApiError::InsufficientMemory(_) => "insufficient_memory",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unauthorized => "unauthorized",
            ApiError::QueueFull => "queue_full",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::NotReady(_) => "not_ready",
            ApiError::Draining => "draining",
            ApiError::Timeout => "timeout",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ApiError {
    /// One of each variant the model endpoints answer, so the API document lists every status
    /// and code they can send (the admin API's load errors are not among them).
    fn every() -> [ApiError; 20] {
        let s = String::new;
        [
            ApiError::BadRequest(s()),
            ApiError::InvalidImage(s()),
            ApiError::BodyTooLarge(s()),
            ApiError::ImageTooLarge(s()),
            ApiError::TooManyImages(s()),
            ApiError::UnusableImage(s()),
            ApiError::BodyTimeout(s()),
            ApiError::Busy(s()),
            ApiError::UnsupportedMediaType(s()),
            ApiError::InvalidParameter(s()),
            ApiError::NotFound(s()),
            ApiError::ModelNotLoaded(s()),
            ApiError::ModelNotFound(s()),
            ApiError::Unauthorized,
            ApiError::QueueFull,
            ApiError::Overloaded {
                message: s(),
                retry_after_s: 1,
            },
            ApiError::NotReady(s()),
            ApiError::Draining,
            ApiError::Timeout,
            ApiError::Internal(s()),
        ]
    }
}

/// The error answers of the model endpoints, for the API document: made from the status table
/// above, so the document cannot drift from what the server sends.
pub struct ModelErrors;

impl utoipa::IntoResponses for ModelErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut codes: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
        for e in ApiError::every() {
            codes.entry(e.status().as_u16()).or_default().push(e.code());
        }
        codes
            .into_iter()
            .map(|(status, codes)| {
                let reason = StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("");
                let content = ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build();
                let mut response = ResponseBuilder::new()
                    .description(format!("{reason}; code: {}", codes.join(", ")))
                    .content("application/json", content);
                if status == 429 || status == 503 {
                    response = response.header(
                        "retry-after",
                        HeaderBuilder::new()
                            .schema(ObjectBuilder::new().schema_type(Type::Integer))
                            .description(Some("Seconds to wait before retrying"))
                            .build(),
                    );
                }
                (status.to_string(), RefOr::T(response.build()))
            })
            .collect()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Image {
                source: ImageError::TooLarge { .. },
                ..
            } => ApiError::ImageTooLarge(e.to_string()),
            ServiceError::Image { .. } => ApiError::InvalidImage(e.to_string()),
            ServiceError::Unusable { .. } => ApiError::UnusableImage(e.to_string()),
            ServiceError::TooManyImages { .. } => ApiError::TooManyImages(e.to_string()),
            ServiceError::NotLoaded(_) => ApiError::ModelNotLoaded(e.to_string()),
            ServiceError::ModelNotFound(_) | ServiceError::WrongTask { .. } => {
                ApiError::ModelNotFound(e.to_string())
            }
            ServiceError::NotReady(_) => ApiError::NotReady(e.to_string()),
            ServiceError::InvalidParameter(m) => ApiError::InvalidParameter(m),
            ServiceError::Draining => ApiError::Draining,
            ServiceError::QueueFull => ApiError::QueueFull,
            ServiceError::Overloaded { retry_after_s, .. } => ApiError::Overloaded {
                message: e.to_string(),
                retry_after_s,
            },
            ServiceError::Timeout => ApiError::Timeout,
            ServiceError::Model(m) => ApiError::Internal(m.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        if let ApiError::Internal(detail) = &self {
            // The span carries the request id.
            tracing::error!(error = %detail, "internal error");
        }
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::QueueFull | ApiError::Busy(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Overloaded { retry_after_s, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            // The rest of a slow body is not worth waiting for: the connection closes.
            ApiError::BodyTimeout(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Draining => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}
