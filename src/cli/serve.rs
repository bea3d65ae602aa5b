//! `detectd serve`: configuration, start-up, and the drain on SIGTERM/SIGINT.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio::sync::Notify;

use super::CacheArgs;
use crate::batch::BatchConfig;
use crate::grpc::{self, GrpcConfig};
use crate::http::{router, AppState};
use crate::http::{BodyLimits, ConnectionLimits};
use crate::metrics::Metrics;
use crate::model::{autotune, ArchChoice, DeviceChoice, Precision, Preset};
use crate::service::settings;
use crate::service::{
    Decoding, Limits, LoadContext, ModelSettings, Registry, Service, SettingsDefaults, Started,
    Task,
};
use crate::weights::hub;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every flag can also be set with the environment variable shown in --help.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, env = "DETECTD_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address for the gRPC API (detectd.v1.Detector, health, reflection); none: no gRPC.
    #[arg(long, env = "DETECTD_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Detector checkpoint file or published name (Faster, Mask or Keypoint R-CNN, read from
    /// the checkpoint): the model named `detector`.
    #[arg(long, env = "DETECTD_DETECTOR_WEIGHTS")]
    pub detector_weights: Option<String>,
    /// ResNet-50 checkpoint file or published name: the model named `classifier`.
    #[arg(long, env = "DETECTD_CLASSIFIER_WEIGHTS")]
    pub classifier_weights: Option<String>,
    /// A model by name: NAME=SOURCE[,key=value...] with the keys of a [[model]] table
    /// (repeat for more; in the environment, separate them with ';').
    #[arg(
        long = "model",
        value_name = "NAME=SOURCE[,KEY=VALUE...]",
        env = "DETECTD_MODELS",
        value_delimiter = ';'
    )]
    pub models: Vec<String>,
    /// A TOML file of [[model]] tables (name, source and the per-model keys); SIGHUP re-reads
    /// it and loads, swaps or unloads what changed.
    #[arg(long, env = "DETECTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Key of the admin API (PUT/DELETE /v1/models/{name}); without it the API does not exist.
    #[arg(long, env = "DETECTD_ADMIN_KEY")]
    pub admin_key: Option<String>,
    /// Resident memory (MiB) the server may reach by loading a model version; a load that
    /// would pass it is refused.
    #[arg(long, env = "DETECTD_MAX_MEMORY_MB", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_memory_mb: Option<u64>,
    /// Detector architecture; auto reads it from the checkpoint.
    #[arg(long, env = "DETECTD_ARCH", value_parser = super::named::<ArchChoice>(), default_value = "auto")]
    pub arch: ArchChoice,
    /// Classifier preprocessing preset (v1: resize 256, v2: resize 232).
    #[arg(long, env = "DETECTD_PRESET", value_parser = super::named::<Preset>(), default_value = "v2")]
    pub preset: Preset,
    /// Detector class names (default: COCO for 91 classes).
    #[arg(long, env = "DETECTD_LABELS")]
    pub labels: Option<PathBuf>,
    /// Classifier class names (default: ImageNet for 1000 classes).
    #[arg(long, env = "DETECTD_CLASSIFIER_LABELS")]
    pub classifier_labels: Option<PathBuf>,
    /// eps of v1's FrozenBatchNorm (default 0.0, as torchvision's COCO weights run).
    #[arg(long, env = "DETECTD_FROZEN_BN_EPS")]
    pub frozen_bn_eps: Option<f64>,
    /// Where the models run: auto (CUDA when a GPU and libtorch_cuda are there, else the CPU),
    /// cpu or cuda.
    #[arg(long, env = "DETECTD_DEVICE", value_parser = super::named::<DeviceChoice>(), default_value = "auto")]
    pub device: DeviceChoice,
    /// Numeric precision. auto (the default) measures fp32-fast, bf16 (and fp16 on CUDA)
    /// at warm-up and keeps the fastest that agrees with fp32; fp32 is torchvision's
    /// arithmetic bit for bit.
    #[arg(long, env = "DETECTD_PRECISION", value_parser = super::named::<Precision>(), default_value = "auto")]
    pub precision: Precision,
    /// The share of fp32's answers `auto` requires of a faster setting on its trial images
    /// (matched detections scoring ≥ 0.3, else the 20 best; equal top-1 classes).
    #[arg(long, env = "DETECTD_AUTO_MIN_AGREEMENT", default_value_t = autotune::MIN_AGREEMENT, value_parser = super::unit_interval)]
    pub auto_min_agreement: f64,
    /// Images per batch, at most.
    #[arg(long, env = "DETECTD_MAX_BATCH_SIZE", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_batch_size: u32,
    /// How long a batch waits for more images after its first.
    #[arg(long, env = "DETECTD_MAX_BATCH_DELAY_MS", default_value_t = 5)]
    pub max_batch_delay_ms: u64,
    /// Images waiting per model, at most (reserved before they are decoded); beyond it
    /// requests get 429.
    #[arg(long, env = "DETECTD_MAX_QUEUE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue: u32,
    /// Images one request may carry; more get 413 too_many_images before any is decoded.
    #[arg(long, env = "DETECTD_MAX_IMAGES_PER_REQUEST", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_images_per_request: u32,
    /// A request not answered by then gets 504 (and is dropped if still queued; a job of
    /// several images stops between images).
    #[arg(long, env = "DETECTD_REQUEST_TIMEOUT_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,
    /// Bytes of one request body (and one gRPC message).
    #[arg(long, env = "DETECTD_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub max_body_bytes: u64,
    /// Bytes of request bodies buffered at once, across all requests; beyond it new requests
    /// get 503 busy with Retry-After.
    #[arg(long, env = "DETECTD_MAX_INFLIGHT_BYTES", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_inflight_bytes: u64,
    /// Larger images are refused from their header, before decoding.
    #[arg(long, env = "DETECTD_MAX_IMAGE_PIXELS", default_value_t = 50_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_image_pixels: u64,
    /// Pixels decoded and prepared at once, across all requests (each image counts its own
    /// pixels and its resized copy's); images beyond wait for room. Bounds decoding memory
    /// to roughly 25 bytes per pixel of this.
    #[arg(long, env = "DETECTD_MAX_DECODING_PIXELS", default_value_t = 64_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_decoding_pixels: u64,
    /// Open HTTP connections (and, separately, gRPC connections) at most; at the cap new
    /// connections wait in the listen backlog.
    #[arg(long, env = "DETECTD_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a client may take to send a request's headers, or leave a kept-alive HTTP/1
    /// connection idle, before it is closed.
    #[arg(long, env = "DETECTD_HEADER_READ_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_s: u64,
    /// Seconds a request body may take to arrive; slower senders get 408 and are closed.
    #[arg(long, env = "DETECTD_BODY_READ_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_s: u64,
    /// HTTP/2 (and gRPC) streams per connection, at most.
    #[arg(long, env = "DETECTD_MAX_CONCURRENT_STREAMS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// Bearer key required by /detect, /classify and /v1/models.
    #[arg(long, env = "DETECTD_API_KEY")]
    pub api_key: Option<String>,
    /// Origins allowed by CORS (repeat, or * for any); none: no CORS headers.
    #[arg(long, env = "DETECTD_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// Log lines as text, or as JSON objects (one per line) for a log collector.
    #[arg(long, env = "DETECTD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// After SIGTERM, how long in-flight and queued requests may take before exit.
    #[arg(long, env = "DETECTD_SHUTDOWN_TIMEOUT_S", default_value_t = 30)]
    pub shutdown_timeout_s: u64,
    /// libtorch intra-op threads (default: all cores).
    #[arg(long, env = "DETECTD_THREADS", value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub threads: Option<i32>,
    /// Images in the warm-up pass (default: --max-batch-size).
    #[arg(long, env = "DETECTD_WARMUP_IMAGES", value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub warmup_images: Option<u32>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

impl ServeArgs {
    /// The configuration as logged: the API key is never printed.
    fn redacted(&self) -> String {
        let mut shown = self.clone();
        if shown.api_key.is_some() {
            shown.api_key = Some("<redacted>".into());
        }
        if shown.admin_key.is_some() {
            shown.admin_key = Some("<redacted>".into());
        }
        format!("{shown:?}")
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DETECTD_LOG")
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<std::process::ExitCode> {
    init_logging(args.log_format);
    tracing::info!(config = %args.redacted(), "starting");
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))?;
    Ok(std::process::ExitCode::SUCCESS)
}

type Starts = Vec<Started>;

/// Fetches every published checkpoint the models name, so that one error lists all the files
/// that are missing rather than the first.
fn fetch_published(all: &[ModelSettings], cache_dir: &std::path::Path) -> anyhow::Result<()> {
    let wanted: Vec<hub::Published> = all
        .iter()
        .map(|m| m.source.as_str())
        .filter(|w| !std::path::Path::new(w).exists())
        .filter_map(hub::find)
        .collect();
    hub::ensure_all(&wanted, cache_dir).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// What a model takes from the flags when its own settings do not say.
fn settings_defaults(args: &ServeArgs) -> SettingsDefaults {
    SettingsDefaults {
        arch: args.arch,
        preset: args.preset,
        frozen_bn_eps: args.frozen_bn_eps,
        device: args.device,
        precision: args.precision,
        batch: BatchConfig {
            max_batch_size: args.max_batch_size as usize,
            max_batch_delay: Duration::from_millis(args.max_batch_delay_ms),
            max_queue: args.max_queue as usize,
        },
    }
}

fn read_config(path: &std::path::Path, d: &SettingsDefaults) -> anyhow::Result<Vec<ModelSettings>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    settings::from_config(&text, d).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))
}

/// Every model the flags and the config file name: the two shorthands first, then --model,
/// then the file's tables.
fn model_settings(args: &ServeArgs) -> anyhow::Result<Vec<ModelSettings>> {
    let d = settings_defaults(args);
    let mut all = Vec::new();
    let shorthands = [
        (
            &args.detector_weights,
            "detector",
            Task::Detect,
            &args.labels,
        ),
        (
            &args.classifier_weights,
            "classifier",
            Task::Classify,
            &args.classifier_labels,
        ),
    ];
    for (weights, name, task, labels) in shorthands {
        if let Some(w) = weights {
            let mut m = ModelSettings::new(name, w, &d);
            m.task = Some(task);
            m.labels = labels.clone();
            all.push(m);
        }
    }
    for flag in &args.models {
        all.push(ModelSettings::from_flag(flag, &d)?);
    }
    if let Some(path) = &args.config {
        all.extend(read_config(path, &d)?);
    }
    Ok(all)
}

fn start_models(args: &ServeArgs, metrics: &Arc<Metrics>) -> anyhow::Result<(Service, Starts)> {
    let all = model_settings(args)?;
    fetch_published(&all, &args.cache.cache_dir)?;
    let registry = Arc::new(Registry::new(LoadContext {
        cache_dir: args.cache.cache_dir.clone(),
        warmup_images: args.warmup_images.map(|n| n as usize),
        min_agreement: args.auto_min_agreement,
        metrics: metrics.clone(),
        max_memory: args.max_memory_mb.map(|mb| mb << 20),
        defaults: settings_defaults(args),
        cpu: crate::batch::CpuShare::new(),
    }));
    let starts = registry.start(all)?;
    let service = Service {
        registry,
        metrics: metrics.clone(),
        limits: Limits {
            max_pixels: args.max_image_pixels,
            max_images: args.max_images_per_request as usize,
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            decoding: Decoding::new(args.max_decoding_pixels),
        },
        admission: Default::default(),
    };
    Ok((service, starts))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let (service, starts) = start_models(&args, &metrics)?;
    if service.registry.is_empty() {
        tracing::warn!(
            "no model loaded: give --detector-weights, --classifier-weights, --model or --config"
        );
    }
    let service = Arc::new(service);
    if let Some(path) = &args.config {
        tokio::spawn(reload_on_sighup(
            Arc::downgrade(&service.registry),
            path.clone(),
            settings_defaults(&args),
        ));
    }
    let body_limits = BodyLimits::new(
        args.max_body_bytes as usize,
        args.max_images_per_request as usize,
        Duration::from_secs(args.body_read_timeout_s),
        usize::try_from(args.max_inflight_bytes).unwrap_or(usize::MAX),
    );
    let state = Arc::new(AppState::new(
        service.clone(),
        args.api_key.clone(),
        args.admin_key.clone(),
        body_limits,
    ));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let grpc_listener = match args.grpc_addr {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await?),
        None => None,
    };
    // Stable lines on stdout that scripts and tests wait for.
    if let Some(g) = &grpc_listener {
        println!("detectd grpc listening on {}", g.local_addr()?);
    }
    println!("detectd listening on http://{addr}");
    tracing::info!(%addr, "listening");
    watch_starts(starts);
    let (drained_tx, drained) = tokio::sync::watch::channel(false);
    let stop = Arc::new(Notify::new());
    tokio::spawn(shutdown_signal(service.clone(), stop.clone(), drained_tx));
    let grpc = grpc_listener.map(|listener| {
        let config = GrpcConfig {
            api_key: args.api_key.clone(),
            max_message_bytes: args.max_body_bytes as usize,
            max_connections: args.max_connections as usize,
            max_concurrent_streams: args.max_concurrent_streams,
            // The message may take the body read timeout to arrive, then the request its own.
            call_timeout: Duration::from_secs(args.body_read_timeout_s)
                + Duration::from_millis(args.request_timeout_ms),
        };
        tokio::spawn(grpc::serve(
            listener,
            service.clone(),
            config,
            when_drained(drained.clone()),
        ))
    });
    let app = router(state.clone(), &args.cors_origin);
    let connections = ConnectionLimits {
        max_connections: args.max_connections as usize,
        header_read_timeout: Duration::from_secs(args.header_read_timeout_s),
        max_concurrent_streams: args.max_concurrent_streams,
    };
    let server = crate::http::serve(
        listener,
        app,
        connections,
        metrics.open_connections.clone(),
        when_drained(drained),
    );
    let limit = Duration::from_secs(args.shutdown_timeout_s);
    tokio::select! {
        _ = server => {},
        _ = async { stop.notified().await; tokio::time::sleep(limit).await } => {
            tracing::warn!(seconds = args.shutdown_timeout_s, "shutdown timeout reached with requests unfinished");
            return Ok(());
        }
    }
    if let Some(grpc) = grpc {
        if let Ok(Err(e)) = tokio::time::timeout(limit, grpc)
            .await
            .unwrap_or(Ok(Ok(())))
        {
            tracing::warn!(error = %e, "grpc server stopped with an error");
        }
    }
    let handles = service.registry.take_workers();
    drop(state);
    drop(service);
    // The batchers are gone with the service: each worker finishes its queue and stops.
    let joined =
        tokio::task::spawn_blocking(move || handles.into_iter().for_each(|h| drop(h.join())));
    let _ = tokio::time::timeout(limit, joined).await;
    tracing::info!("stopped");
    Ok(())
}

/// Exits the process if a model fails to load at start.
fn watch_starts(starts: Starts) {
    for (name, started) in starts {
        tokio::spawn(async move {
            match started.await {
                Ok(Ok(())) => tracing::info!(model = %name, "model ready"),
                Ok(Err(e)) => fail_start(&format!("model {name:?}: {e}")),
                Err(_) => fail_start(&format!(
                    "model {name:?}: its worker exited during start-up"
                )),
            }
        });
    }
}

/// On SIGHUP, reads `--config` again and applies the difference: models gone from the file
/// are unloaded, new or changed ones loaded (each swapped in once warm, as a PUT does).
/// Models from flags or the admin API are left alone. A file that does not parse changes
/// nothing.
async fn reload_on_sighup(registry: Weak<Registry>, path: PathBuf, defaults: SettingsDefaults) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    let mut applied = read_config(&path, &defaults).unwrap_or_default();
    while hup.recv().await.is_some() {
        let Some(registry) = registry.upgrade() else {
            return;
        };
        match read_config(&path, &defaults) {
            Ok(wanted) => {
                apply_config(&registry, &applied, &wanted).await;
                applied = wanted;
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: config not applied"),
        }
    }
}

async fn apply_config(
    registry: &Arc<Registry>,
    applied: &[ModelSettings],
    wanted: &[ModelSettings],
) {
    for gone in applied
        .iter()
        .filter(|a| wanted.iter().all(|w| w.name != a.name))
    {
        match registry.delete(&gone.name) {
            Ok(()) => tracing::info!(model = %gone.name, "SIGHUP: unloaded"),
            Err(e) => tracing::warn!(model = %gone.name, error = %e, "SIGHUP: not unloaded"),
        }
    }
    let serving = registry.settings();
    for m in wanted.iter().filter(|w| !serving.contains(w)) {
        match registry.put(m.clone()).await {
            Ok(s) => tracing::info!(model = %m.name, version = ?s.version, "SIGHUP: loaded"),
            Err(e) => tracing::error!(model = %m.name, error = %e, "SIGHUP: load failed"),
        }
    }
}

async fn when_drained(mut drained: tokio::sync::watch::Receiver<bool>) {
    let _ = drained.wait_for(|d| *d).await;
}

fn fail_start(reason: &str) {
    tracing::error!(%reason, "model failed to start");
    eprintln!("detectd: {reason}");
    std::process::exit(1);
}

/// On SIGTERM or SIGINT, drains: /readyz and gRPC health turn unavailable and new work is
/// refused at once, while the listeners stay open (so load balancers see the 503) until every
/// request in flight on either edge has been answered. Then `drained` tells both servers to
/// close their listeners and idle connections.
async fn shutdown_signal(
    service: Arc<Service>,
    stop: Arc<Notify>,
    drained: tokio::sync::watch::Sender<bool>,
) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    let admission = &service.admission;
    admission.start_draining();
    tracing::info!(
        in_flight = admission.in_flight(),
        "signal received: draining"
    );
    stop.notify_one();
    while admission.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!("drained");
    let _ = drained.send(true);
}
