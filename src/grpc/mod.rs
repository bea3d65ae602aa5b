//! The gRPC edge (tonic): `detectd.v1.Detector` from proto/, the standard health service and
//! server reflection. Like the HTTP edge it handles bytes only and reaches the models through
//! `service::Service`, so both share one batcher, one set of limits and one drain.

mod convert;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::service::{ImageInput, Key, Options, Results, Service, ServiceError};

/// Code generated from proto/detectd/v1/detectd.proto (server and client).
pub mod pb {
    tonic::include_proto!("detectd.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("detectd_descriptor");
}

use pb::detector_server::{Detector, DetectorServer};

/// The gRPC status table: what each service error means to a gRPC client.
pub fn status(e: ServiceError) -> Status {
    let message = e.to_string();
    match e {
        ServiceError::Image { .. }
        | ServiceError::Unusable { .. }
        | ServiceError::TooManyImages { .. }
        | ServiceError::InvalidParameter(_) => Status::invalid_argument(message),
        ServiceError::NotLoaded(_)
        | ServiceError::ModelNotFound(_)
        | ServiceError::WrongTask { .. } => Status::not_found(message),
        ServiceError::NotReady(_) | ServiceError::Draining => Status::unavailable(message),
        ServiceError::QueueFull => Status::resource_exhausted(message),
        // gRPC's retry policy reads this trailer as the time to wait before a retry.
        ServiceError::Overloaded { retry_after_s, .. } => {
            let mut status = Status::unavailable(message);
            if let Ok(ms) = (retry_after_s * 1000).to_string().parse() {
                status.metadata_mut().insert("grpc-retry-pushback-ms", ms);
            }
            status
        }
        ServiceError::Timeout => Status::deadline_exceeded(message),
        ServiceError::Model(m) => {
            tracing::error!(error = %m, "internal error");
            Status::internal("internal error")
        }
    }
}

pub struct DetectorApi {
    service: Arc<Service>,
}

impl DetectorApi {
    /// Runs one RPC: counts it as in flight (the drain waits for it), applies the client's
    /// deadline, and records the request metrics under the method's name.
    async fn call<T, F, Fut>(
        &self,
        method: &str,
        timeout: Option<Duration>,
        f: F,
    ) -> Result<T, Status>
    where
        F: FnOnce(Arc<Service>, Instant) -> Fut,
        Fut: Future<Output = Result<T, ServiceError>>,
    {
        let call = self.service.call(format!("grpc:{method}"));
        let deadline = self.service.deadline(call.started(), timeout);
        let result = f(self.service.clone(), deadline).await.map_err(status);
        let code = match &result {
            Ok(_) => "OK".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        call.finish(&code);
        result
    }
}

/// The client's `grpc-timeout` (e.g. `250m`), so a request the client gave up on is dropped
/// from the queue instead of run.
fn client_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl DetectorApi {
    /// One inference RPC: `images` through the model `model` names (the task's default when
    /// empty) with `options`; the answering version and each image's results.
    async fn infer(
        &self,
        method: &str,
        timeout: Option<Duration>,
        model: String,
        images: Vec<ImageInput>,
        options: Options,
    ) -> Result<(pb::ModelVersion, Results), Status> {
        if images.is_empty() {
            return Err(Status::invalid_argument("the request holds no image"));
        }
        let model = convert::model_name(model);
        let answer = self
            .call(method, timeout, |s, deadline| async move {
                s.infer(model.as_deref(), images, &options, deadline).await
            })
            .await?;
        Ok((convert::version(&answer.model), answer.results))
    }
}

#[tonic::async_trait]
impl Detector for DetectorApi {
    async fn detect(
        &self,
        request: Request<pb::DetectRequest>,
    ) -> Result<Response<pb::DetectResponse>, Status> {
        let timeout = client_timeout(&request);
        let r = request.into_inner();
        let options = convert::detect_options(convert::DetectFields {
            score_threshold: r.score_threshold,
            max_detections: r.max_detections,
            labels: r.labels,
            mask_format: r.mask_format,
            mask_threshold: r.mask_threshold,
        });
        let images = vec![r.image.into()];
        let (version, results) = self
            .infer("Detect", timeout, r.model, images, options.into())
            .await?;
        let first = convert::detect_responses(results)?.into_iter().next();
        first
            .map(|f| {
                Response::new(pb::DetectResponse {
                    model: Some(version),
                    ..f
                })
            })
            .ok_or_else(|| Status::internal("no result for the image"))
    }

    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let timeout = client_timeout(&request);
        let r = request.into_inner();
        let options = convert::classify_options(r.top_k);
        let images = vec![r.image.into()];
        let (version, results) = self
            .infer("Classify", timeout, r.model, images, options.into())
            .await?;
        let first = convert::classify_responses(results)?.into_iter().next();
        first
            .map(|f| {
                Response::new(pb::ClassifyResponse {
                    model: Some(version),
                    ..f
                })
            })
            .ok_or_else(|| Status::internal("no result for the image"))
    }

    async fn detect_batch(
        &self,
        request: Request<pb::DetectBatchRequest>,
    ) -> Result<Response<pb::DetectBatchResponse>, Status> {
        let timeout = client_timeout(&request);
        let r = request.into_inner();
        let options = convert::detect_options(convert::DetectFields {
            score_threshold: r.score_threshold,
            max_detections: r.max_detections,
            labels: r.labels,
            mask_format: r.mask_format,
            mask_threshold: r.mask_threshold,
        });
        let images = r.images.into_iter().map(Into::into).collect();
        let (version, results) = self
            .infer("DetectBatch", timeout, r.model, images, options.into())
            .await?;
        let results = convert::detect_responses(results)?;
        let model = Some(version);
        Ok(Response::new(pb::DetectBatchResponse { results, model }))
    }

    async fn classify_batch(
        &self,
        request: Request<pb::ClassifyBatchRequest>,
    ) -> Result<Response<pb::ClassifyBatchResponse>, Status> {
        let timeout = client_timeout(&request);
        let r = request.into_inner();
        let options = convert::classify_options(r.top_k);
        let images = r.images.into_iter().map(Into::into).collect();
        let (version, results) = self
            .infer("ClassifyBatch", timeout, r.model, images, options.into())
            .await?;
        let results = convert::classify_responses(results)?;
        let model = Some(version);
        Ok(Response::new(pb::ClassifyBatchResponse { results, model }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(convert::models(&self.service)))
    }
}

/// Refuses calls without the API key (as `authorization: Bearer KEY` metadata).
fn check_key(key: Key) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if key.allows(given) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("missing or invalid API key"))
        }
    }
}

/// Keeps the health service in step with the server: SERVING once every model is ready,
/// NOT_SERVING before that and from the moment a drain starts.
async fn track_health(service: Arc<Service>, reporter: HealthReporter) {
    let mut last = None;
    loop {
        let serving = service.ready() && !service.admission.is_draining();
        if last != Some(serving) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in ["", "detectd.v1.Detector"] {
                reporter.set_service_status(name, status).await;
            }
            last = Some(serving);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct GrpcConfig {
    pub api_key: Option<String>,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    /// Calls that take longer, the message's arrival included, are cancelled (tonic's own
    /// limit, as CANCELLED; the request deadline inside it answers DEADLINE_EXCEEDED).
    pub call_timeout: Duration,
}

/// A connection that holds its place under the connection cap for as long as it lives.
struct Held {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Held {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl tokio::io::AsyncRead for Held {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Held {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepted connections, at most `max` open at once: at the cap, accepting waits (new
/// clients wait in the listen backlog) instead of taking on more.
fn capped(
    listener: tokio::net::TcpListener,
    max: usize,
) -> impl tokio_stream::Stream<Item = std::io::Result<Held>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
    futures_util::stream::unfold((listener, permits), |(listener, permits)| async move {
        let permit = permits.clone().acquire_owned().await.ok()?;
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            Held {
                stream,
                _permit: permit,
            }
        });
        if accepted.is_err() {
            // Out of descriptors, say: tonic goes straight back to accepting, so pause here.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some((accepted, (listener, permits)))
    })
}

/// Serves gRPC on `listener` until `shutdown` resolves; calls in flight then finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    config: GrpcConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let tracker = tokio::spawn(track_health(service.clone(), reporter));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let detector = DetectorServer::new(DetectorApi { service })
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let detector = tonic::service::interceptor::InterceptedService::new(
        detector,
        check_key(Key::new(config.api_key)),
    );
    let incoming = capped(listener, config.max_connections);
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .concurrency_limit_per_connection(config.max_concurrent_streams as usize)
        .timeout(config.call_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health)
        .add_service(reflection)
        .add_service(detector)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    tracker.abort();
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overloaded_model_is_unavailable_with_a_retry_pushback() {
        let s = status(ServiceError::Overloaded {
            expected_s: 90.0,
            budget_s: 60.0,
            retry_after_s: 30,
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("overloaded"), "{}", s.message());
        let pushback = s.metadata().get("grpc-retry-pushback-ms");
        assert_eq!(pushback.and_then(|v| v.to_str().ok()), Some("30000"));
    }
}
