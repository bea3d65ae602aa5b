//! The admin API, routed only when the server has `--admin-key`: load a new version of a model
//! by name (`PUT /v1/models/{name}`, the same keys as a `[[model]]` table) and unload one
//! (`DELETE`). A load answers once the new version serves, or with why it did not.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::handlers::model_status;
use super::AppState;
use crate::api::ModelStatus;
use crate::service::settings::{scalar_text, ModelSettings};
use crate::service::LoadError;

/// Loads a new version of `name` beside the serving one and switches to it once warm.
pub async fn put_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Json<ModelStatus>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut pairs = Vec::with_capacity(body.len());
    for (key, value) in body {
        let text = scalar_text(&value)
            .map_err(|e| ApiError::InvalidParameter(format!("model {name:?}: {key}: {e}")))?;
        pairs.push((key, text));
    }
    let registry = state.service.registry.clone();
    let settings = ModelSettings::from_pairs(&name, pairs, &registry.context.defaults)
        .map_err(|e| ApiError::InvalidParameter(e.to_string()))?;
    // On its own task: a client that hangs up does not cancel a load half done.
    let loaded = tokio::spawn(async move { registry.put(settings).await })
        .await
        .map_err(|e| ApiError::Internal(format!("the load stopped: {e}")))?;
    match loaded {
        Ok(m) => Ok(Json(model_status(m))),
        Err(e @ LoadError::Memory(_)) => Err(ApiError::InsufficientMemory(e.to_string())),
        Err(e @ LoadError::Conflict(_)) => Err(ApiError::Conflict(e.to_string())),
        Err(e @ LoadError::Failed(_)) => Err(ApiError::LoadFailed(e.to_string())),
    }
}

/// Stops routing to `name`; requests it accepted are still answered, then it is freed.
pub async fn delete_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service.registry.delete(&name)?;
    Ok(StatusCode::NO_CONTENT)
}
