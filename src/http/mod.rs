//! The HTTP edge (axum): routes, parameters, the error table, request ids, metrics and auth.
//! It handles bytes and JSON only; models are reached through `service::Service`.

mod admin;
mod error;
mod handlers;
pub(crate) mod input;
mod server;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

pub use error::ApiError;
pub use input::Limits as BodyLimits;
pub use server::{serve, ConnectionLimits};

use crate::service::{Key, Service};

pub struct AppState {
    pub service: Arc<Service>,
    pub api_key: Key,
    /// The admin API's key; without one the admin routes do not exist.
    pub admin_key: Key,
    pub input: input::Limits,
}

impl AppState {
    pub fn new(
        service: Arc<Service>,
        api_key: Option<String>,
        admin_key: Option<String>,
        input: input::Limits,
    ) -> Self {
        Self {
            service,
            api_key: Key::new(api_key),
            admin_key: Key::new(admin_key),
            input,
        }
    }
}

/// The API document, made from the handlers' annotations and types.
#[derive(OpenApi)]
#[openapi(
    info(title = "detectd", description = "Object detection and image classification, torchvision-exact."),
    paths(
        handlers::detect, handlers::classify, handlers::detect_named, handlers::classify_named,
        handlers::models,
        handlers::healthz, handlers::readyz, handlers::metrics, handlers::page,
    ),
    components(schemas(crate::api::ErrorBody)),
    modifiers(&BearerKey),
)]
pub struct ApiDoc;

/// The `api_key` security scheme: `Authorization: Bearer KEY` when the server has a key.
struct BearerKey;

impl Modify for BearerKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Endpoint label values are fixed (route templates, not paths), so the metric series stay
/// bounded.
const ENDPOINTS: [&str; 12] = [
    "/",
    "/openapi.json",
    "/docs",
    "/detect",
    "/classify",
    "/v1/models",
    "/v1/models/{name}/detect",
    "/v1/models/{name}/classify",
    "/v1/models/{name}",
    "/healthz",
    "/readyz",
    "/metrics",
];

pub fn router(state: Arc<AppState>, cors_origins: &[String]) -> Router {
    let guarded = Router::new()
        .route("/detect", post(handlers::detect))
        .route("/classify", post(handlers::classify))
        .route("/v1/models/{name}/detect", post(handlers::detect_named))
        .route("/v1/models/{name}/classify", post(handlers::classify_named))
        .route("/v1/models", get(handlers::models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let mut app = Router::new().merge(guarded);
    if state.admin_key.is_set() {
        let admin = Router::new()
            .route(
                "/v1/models/{name}",
                put(admin::put_model).delete(admin::delete_model),
            )
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_admin_key,
            ));
        app = app.merge(admin);
    }
    let mut app = app
        .route("/", get(handlers::page))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .fallback(handlers::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state);
    if !cors_origins.is_empty() {
        app = app.layer(cors(cors_origins));
    }
    app
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            REQUEST_ID,
            HeaderName::from_static(handlers::TIMEOUT_HEADER),
        ])
        .expose_headers([REQUEST_ID, SERVER_TIMING, header::RETRY_AFTER])
}

/// Bearer key check for the model endpoints; the page, health and metrics stay open.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check_key(&request, &state.api_key)?;
    Ok(next.run(request).await)
}

/// The admin API's own key (never the API key).
async fn require_admin_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check_key(&request, &state.admin_key)?;
    Ok(next.run(request).await)
}

fn check_key(request: &Request, key: &Key) -> Result<(), ApiError> {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if key.allows(given) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// A client's request id when it is a sane token, else a new one.
fn request_id(request: &Request) -> String {
    request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Request id, tracing span, request metrics and the total in Server-Timing.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let id = request_id(&request);
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(request.uri().path(), MatchedPath::as_str);
    let endpoint = ENDPOINTS
        .iter()
        .find(|e| **e == path)
        .copied()
        .unwrap_or("other");
    let span = tracing::info_span!("request", id = %id, method = %request.method(), endpoint);
    let call = state.service.call(endpoint);
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    let elapsed = call.finish(status.as_str());
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    let total = format!("total;dur={:.1}", elapsed.as_secs_f64() * 1000.0);
    let timing = match headers.get(&SERVER_TIMING).and_then(|v| v.to_str().ok()) {
        Some(parts) => format!("{parts}, {total}"),
        None => total,
    };
    if let Ok(v) = HeaderValue::from_str(&timing) {
        headers.insert(SERVER_TIMING, v);
    }
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            ms = elapsed.as_millis() as u64,
            "done"
        )
    });
    response
}
