//! The models a server holds, by name. Each name has at most one serving version. A request
//! takes the serving version when it is admitted (an `Arc`), so its answer comes from that one
//! version however the name is swapped meanwhile; a replaced or deleted version keeps its
//! worker until its last request lets it go, and then its queue drains and its thread ends.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;

use serde::Serialize;

use super::engines::{start, DetectorKind, ModelKind, ModelSpec};
use super::settings::{ModelSettings, SettingsDefaults};
use super::{ClassifierServed, DetectorServed, ModelInfo, ServiceError};
use crate::batch::{BatchConfig, CpuShare};
use crate::metrics::Metrics;
use crate::model::autotune::Decision;
use crate::model::detector::DetectorParams;
use crate::model::{device, task_of, ModelError, Named, Preset, Task};

/// A loaded model of either task.
pub enum Loaded {
    Detector {
        served: DetectorServed,
        params: DetectorParams,
    },
    Classifier {
        served: ClassifierServed,
        preset: Preset,
    },
}

/// What the listing needs of a loaded model, whatever its task.
macro_rules! either {
    ($loaded:expr, $s:ident => $e:expr) => {
        match $loaded {
            Loaded::Detector { served: $s, .. } => $e,
            Loaded::Classifier { served: $s, .. } => $e,
        }
    };
}

impl Loaded {
    pub fn task(&self) -> Task {
        match self {
            Loaded::Detector { .. } => Task::Detect,
            Loaded::Classifier { .. } => Task::Classify,
        }
    }

    pub fn info(&self) -> ModelInfo {
        either!(self, s => s.info())
    }

    pub fn ready(&self) -> bool {
        either!(self, s => s.batcher.is_ready())
    }

    fn batching(&self) -> BatchConfig {
        either!(self, s => s.batcher.config())
    }

    fn precision_trial(&self) -> Option<Decision> {
        either!(self, s => s.precision_trial())
    }

    fn memory_bytes(&self) -> Option<u64> {
        either!(self, s => s.memory_bytes())
    }
}

/// One loaded version of a named model.
pub struct Version {
    pub number: u64,
    pub settings: ModelSettings,
    pub model: Loaded,
    metrics: Arc<Metrics>,
}

impl Drop for Version {
    /// The version's gauges go with it; its counters and histograms stay, as Prometheus wants.
    fn drop(&mut self) {
        let info = self.model.info();
        let v = self.number.to_string();
        let m = &self.metrics;
        let _ = m.model_info.remove_label_values(&[
            &info.name,
            &v,
            &info.arch,
            &info.device,
            &info.precision,
        ]);
        let _ = m.queue_depth.remove_label_values(&[&info.name, &v]);
        let _ = m.expected_wait.remove_label_values(&[&info.name, &v]);
    }
}

/// Where a name or one of its versions stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Loading its weights or warming up.
    Loading,
    Ready,
    /// Replaced or deleted: answering the requests it accepted, taking no new ones.
    Draining,
    /// Its load failed (`error` says why).
    Failed,
}

impl State {
    /// The name every edge shows (the JSON's, by serde, is the same).
    pub fn name(self) -> &'static str {
        match self {
            State::Loading => "loading",
            State::Ready => "ready",
            State::Draining => "draining",
            State::Failed => "failed",
        }
    }
}

/// A load beside the serving version, or the last one's failure.
#[derive(Debug, Clone)]
pub struct Pending {
    pub version: u64,
    pub state: State,
    pub error: Option<String>,
}

/// A model as every edge lists it (each renders it in its own shape, from these fields and
/// the methods below).
pub struct ModelState {
    pub name: String,
    pub task: Option<Task>,
    pub default: bool,
    pub state: State,
    /// The serving version's number and what it is.
    pub version: Option<u64>,
    pub info: Option<ModelInfo>,
    pub settings: ModelSettings,
    pub batching: BatchConfig,
    pub precision_trial: Option<Decision>,
    pub memory_bytes: Option<u64>,
    pub pending: Option<Pending>,
    /// Older versions still answering what they accepted.
    pub draining: Vec<u64>,
}

impl ModelState {
    pub fn ready(&self) -> bool {
        self.state == State::Ready
    }

    /// What a detector's detections carry (`boxes`, and `masks` or `keypoints`); None for a
    /// classifier, or before a version serves.
    pub fn outputs(&self) -> Option<Vec<String>> {
        let info = self.info.as_ref()?;
        (self.task == Some(Task::Detect)).then(|| info.outputs())
    }

    /// A Keypoint R-CNN's keypoint names and skeleton.
    pub fn keypoints(&self) -> Option<&crate::labels::KeypointSchema> {
        self.info.as_ref()?.keypoints.as_ref()
    }

    /// Why the last load of the name failed, while no later one has succeeded.
    pub fn error(&self) -> Option<&str> {
        self.pending.as_ref()?.error.as_deref()
    }

    /// What loading and warming the serving version added to the resident memory, in MiB
    /// (rounded).
    pub fn memory_mib(&self) -> Option<u64> {
        self.memory_bytes
            .map(|b| (b as f64 / 1_048_576.0).round() as u64)
    }
}

struct Slot {
    name: String,
    /// The settings last asked for (the serving version's own are in it).
    settings: ModelSettings,
    task: Option<Task>,
    default: bool,
    serving: Option<Arc<Version>>,
    pending: Option<Pending>,
    /// The last version number given.
    versions: u64,
}

/// What loading a version needs besides its settings: the server's own settings.
pub struct LoadContext {
    pub cache_dir: PathBuf,
    /// None: as many as the version's batch size.
    pub warmup_images: Option<usize>,
    pub min_agreement: f64,
    pub metrics: Arc<Metrics>,
    /// Resident memory the process may reach by loading a version, in bytes.
    pub max_memory: Option<u64>,
    /// What a model's settings do not say (the server's flags), for admin loads.
    pub defaults: SettingsDefaults,
    /// The turns every model on the CPU takes (each with its `weight`).
    pub cpu: Arc<CpuShare>,
}

/// A model's name and the channel that answers when its first version is warm.
pub type Started = (
    String,
    tokio::sync::oneshot::Receiver<Result<(), ModelError>>,
);

/// A version started on its worker: ready once `started` answers.
pub struct Starting {
    pub version: Arc<Version>,
    pub started: tokio::sync::oneshot::Receiver<Result<(), ModelError>>,
    pub worker: JoinHandle<()>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// Over `--max-memory-mb`.
    #[error("{0}")]
    Memory(String),
    /// At odds with what the server holds.
    #[error("{0}")]
    Conflict(String),
    /// The weights or settings did not load.
    #[error("{0}")]
    Failed(String),
}

pub struct Registry {
    slots: RwLock<Vec<Slot>>,
    retired: Mutex<Vec<Weak<Version>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// One load at a time: each measures its own memory, and two PUTs of a name cannot race.
    loading: tokio::sync::Mutex<()>,
    pub context: LoadContext,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    pub fn new(context: LoadContext) -> Self {
        Self {
            slots: RwLock::default(),
            retired: Mutex::default(),
            workers: Mutex::default(),
            loading: tokio::sync::Mutex::new(()),
            context,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Slot>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The version a request for `name` (or the task's default model) goes to.
    pub fn pick(&self, name: Option<&str>, task: Task) -> Result<Arc<Version>, ServiceError> {
        let slots = self.read();
        let of_task = |s: &&Slot| s.task == Some(task);
        let slot = match name {
            Some(name) => {
                let slot = slots
                    .iter()
                    .find(|s| s.name == name)
                    .ok_or_else(|| ServiceError::ModelNotFound(name.into()))?;
                if slot.task.is_some_and(|t| t != task) {
                    return Err(ServiceError::WrongTask {
                        name: name.into(),
                        task: slot.task.map_or("", |t| t.name()),
                    });
                }
                slot
            }
            None => slots
                .iter()
                .filter(of_task)
                .find(|s| s.default)
                .or_else(|| slots.iter().find(of_task))
                .ok_or(ServiceError::NotLoaded(task_noun(task)))?,
        };
        match &slot.serving {
            Some(v) if v.model.ready() => Ok(v.clone()),
            _ => Err(ServiceError::NotReady(slot.name.clone())),
        }
    }

    /// Every model, in the order they were configured, then deleted ones still draining.
    pub fn list(&self) -> Vec<ModelState> {
        let draining = self.draining();
        let slots = self.read();
        let mut out: Vec<ModelState> = slots.iter().map(|s| slot_state(s, &draining)).collect();
        for v in draining
            .iter()
            .filter(|v| !slots.iter().any(|s| s.name == v.settings.name))
        {
            out.push(version_state(v, State::Draining, false, Vec::new()));
        }
        out
    }

    /// Replaced versions still alive (held by requests in flight).
    fn draining(&self) -> Vec<Arc<Version>> {
        let mut retired = lock(&self.retired);
        retired.retain(|w| w.strong_count() > 0);
        retired.iter().filter_map(Weak::upgrade).collect()
    }

    /// Every name with a serving version is warm (a name whose first load failed does not
    /// hold the server back; it is listed as failed).
    pub fn ready(&self) -> bool {
        self.read()
            .iter()
            .all(|s| s.serving.as_ref().is_none_or(|v| v.model.ready()))
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub fn has(&self, name: &str) -> bool {
        self.read().iter().any(|s| s.name == name)
    }

    /// The worker threads to join at shutdown.
    pub fn take_workers(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *lock(&self.workers))
    }

    /// Loads version 1 of each model at start, one after another, serving each at once (as
    /// `loading` until warm): a bad file fails the start before the server listens. Answers
    /// each model's name with the channel that says when its warm-up is done.
    pub fn start(&self, all: Vec<ModelSettings>) -> Result<Vec<Started>, LoadError> {
        let mut started = Vec::new();
        for settings in all {
            if self.has(&settings.name) {
                return Err(LoadError::Conflict(format!(
                    "model {:?} is configured twice",
                    settings.name
                )));
            }
            let s = self.load(settings, 1)?;
            self.write().push(Slot {
                name: s.version.settings.name.clone(),
                settings: s.version.settings.clone(),
                task: Some(s.version.model.task()),
                default: s.version.settings.default,
                serving: Some(s.version.clone()),
                pending: None,
                versions: 1,
            });
            lock(&self.workers).push(s.worker);
            started.push((s.version.settings.name.clone(), s.started));
        }
        Ok(started)
    }

    /// Serves `model`, loaded by the caller, as the next version of `settings.name` (an
    /// embedding program's or a test's own engine).
    pub fn insert(&self, settings: ModelSettings, model: Loaded) {
        let mut slots = self.write();
        let number = slots
            .iter()
            .find(|s| s.name == settings.name)
            .map_or(1, |s| s.versions + 1);
        let version = Arc::new(Version {
            number,
            settings: settings.clone(),
            model,
            metrics: self.context.metrics.clone(),
        });
        let old = match slots.iter_mut().find(|s| s.name == settings.name) {
            Some(slot) => {
                slot.versions = number;
                slot.settings = settings;
                slot.serving.replace(version)
            }
            None => {
                slots.push(Slot {
                    name: settings.name.clone(),
                    task: Some(version.model.task()),
                    default: settings.default,
                    settings,
                    serving: Some(version),
                    pending: None,
                    versions: number,
                });
                None
            }
        };
        drop(slots);
        self.retire(old);
    }

    /// Loads a new version of `settings.name` beside the serving one, warms it up, then routes
    /// new requests to it; the old one drains. A failure leaves the serving version as it was
    /// and is listed with the name.
    pub async fn put(self: &Arc<Self>, settings: ModelSettings) -> Result<ModelState, LoadError> {
        let _one = self.loading.lock().await;
        let name = settings.name.clone();
        let number = self.begin(&settings);
        let this = self.clone();
        let loaded = tokio::task::spawn_blocking(move || this.load(settings, number))
            .await
            .map_err(|e| LoadError::Failed(format!("the load stopped: {e}")))
            .and_then(|r| r);
        let outcome = match loaded {
            Ok(Starting {
                version,
                started,
                worker,
            }) => match started.await {
                Ok(Ok(())) => self
                    .check_memory_after(&version)
                    .map(|()| (version, worker)),
                Ok(Err(e)) => Err(LoadError::Failed(format!("model {name:?}: {e}"))),
                Err(_) => Err(LoadError::Failed("the model worker stopped".into())),
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok((version, worker)) => {
                lock(&self.workers).push(worker);
                self.promote(&name, version);
                self.state_of(&name).ok_or_else(|| {
                    LoadError::Conflict(format!("model {name:?} was deleted while it loaded"))
                })
            }
            Err(e) => {
                self.fail(&name, number, &e);
                Err(e)
            }
        }
    }

    /// Stops routing to `name`; its versions drain and are freed.
    pub fn delete(&self, name: &str) -> Result<(), ServiceError> {
        let mut slots = self.write();
        let i = slots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| ServiceError::ModelNotFound(name.into()))?;
        let slot = slots.remove(i);
        drop(slots);
        self.retire(slot.serving);
        Ok(())
    }

    /// Settings of every configured name, as loaded (for SIGHUP's difference).
    pub fn settings(&self) -> Vec<ModelSettings> {
        self.read()
            .iter()
            .filter_map(|s| s.serving.as_ref().map(|v| v.settings.clone()))
            .collect()
    }

    fn retire(&self, version: Option<Arc<Version>>) {
        if let Some(v) = version {
            lock(&self.retired).push(Arc::downgrade(&v));
        }
    }

    /// Marks a load of the name as started (making the slot if the name is new); its number.
    fn begin(&self, settings: &ModelSettings) -> u64 {
        let mut slots = self.write();
        let slot = match slots.iter().position(|s| s.name == settings.name) {
            Some(i) => &mut slots[i],
            None => {
                slots.push(Slot {
                    name: settings.name.clone(),
                    settings: settings.clone(),
                    task: settings.task,
                    default: settings.default,
                    serving: None,
                    pending: None,
                    versions: 0,
                });
                slots.last_mut().expect("just pushed")
            }
        };
        slot.versions += 1;
        slot.settings = settings.clone();
        slot.pending = Some(Pending {
            version: slot.versions,
            state: State::Loading,
            error: None,
        });
        slot.versions
    }

    fn promote(&self, name: &str, version: Arc<Version>) {
        let mut slots = self.write();
        let old = match slots.iter_mut().find(|s| s.name == name) {
            Some(slot) => {
                slot.task = Some(version.model.task());
                slot.default = version.settings.default;
                slot.pending = None;
                slot.serving.replace(version)
            }
            // Deleted while loading: the new version is not served.
            None => Some(version),
        };
        drop(slots);
        self.retire(old);
    }

    fn fail(&self, name: &str, number: u64, error: &LoadError) {
        if let Some(slot) = self.write().iter_mut().find(|s| s.name == name) {
            if let Some(p) = slot.pending.as_mut().filter(|p| p.version == number) {
                p.state = State::Failed;
                p.error = Some(error.to_string());
            }
        }
    }

    fn state_of(&self, name: &str) -> Option<ModelState> {
        let draining = self.draining();
        let slots = self.read();
        slots
            .iter()
            .find(|s| s.name == name)
            .map(|s| slot_state(s, &draining))
    }

    /// Loads the weights and starts the worker (which warms up); blocking.
    fn load(&self, settings: ModelSettings, number: u64) -> Result<Starting, LoadError> {
        let ctx = &self.context;
        let failed = |e: String| LoadError::Failed(format!("model {:?}: {e}", settings.name));
        let weights = crate::weights::hub::resolve(
            &settings.source,
            settings.sha256.as_deref(),
            &ctx.cache_dir,
        )
        .map_err(failed)?;
        self.check_memory_before(&settings, &weights)?;
        let task = match settings.task {
            Some(t) => t,
            None => task_of(&weights).map_err(|e| failed(e.to_string()))?,
        };
        if let Some(known) = self.read().iter().find(|s| s.name == settings.name) {
            if known.task.is_some_and(|t| t != task) {
                return Err(LoadError::Conflict(format!(
                    "model {:?} {}s; the new weights would make it {} (delete it first)",
                    settings.name,
                    known.task.map_or("", |t| t.name()),
                    task.name()
                )));
            }
        }
        let device = device::resolve(settings.device).map_err(|e| failed(e.to_string()))?;
        let warmup_images = ctx.warmup_images.unwrap_or(settings.batch.max_batch_size);
        let batch = settings.batch;
        // A GPU model's runs leave the CPU to the others: only CPU models take turns.
        let cpu = (device == tch::Device::Cpu).then(|| ctx.cpu.join(settings.weight));
        let kind = match task {
            Task::Detect => ModelKind::Detector(DetectorKind {
                arch: settings.arch,
                frozen_bn_eps: settings
                    .frozen_bn_eps
                    .or_else(|| crate::weights::hub::frozen_bn_eps_of(&settings.source)),
                params: settings.detector,
            }),
            Task::Classify => ModelKind::Classifier {
                preset: settings.preset,
            },
        };
        let spec = ModelSpec {
            name: settings.name.clone(),
            version: number,
            weights,
            labels: settings.labels.clone(),
            device,
            precision: settings.precision,
            warmup_images,
            cache_dir: ctx.cache_dir.clone(),
            min_agreement: ctx.min_agreement,
            kind,
        };
        let (model, started, worker) =
            start(spec, batch, cpu, ctx.metrics.clone()).map_err(|e| failed(format!("{e:#}")))?;
        // Series a dashboard or a test reads exist from the load on, at 0.
        let labels = [settings.name.as_str(), &number.to_string()];
        ctx.metrics.queue_depth.with_label_values(&labels).set(0);
        ctx.metrics.images.with_label_values(&labels).inc_by(0);
        let version = Arc::new(Version {
            number,
            settings,
            model,
            metrics: ctx.metrics.clone(),
        });
        Ok(Starting {
            version,
            started,
            worker,
        })
    }

    /// With `--max-memory-mb`, refuses a load whose expected cost would pass the bound: what
    /// this name's serving version measured, else twice the checkpoint's size (its weights,
    /// and as much again for a warm-up's activations).
    fn check_memory_before(
        &self,
        settings: &ModelSettings,
        weights: &Path,
    ) -> Result<(), LoadError> {
        let Some(max) = self.context.max_memory else {
            return Ok(());
        };
        let measured = self
            .read()
            .iter()
            .find(|s| s.name == settings.name)
            .and_then(|s| s.serving.as_ref())
            .and_then(|v| v.model.memory_bytes());
        let file = std::fs::metadata(weights).map(|m| m.len()).unwrap_or(0);
        let expected = measured.unwrap_or(2 * file);
        let now = super::memory::rss().unwrap_or(0);
        if now + expected > max {
            return Err(LoadError::Memory(format!(
                "model {:?}: loading it needs about {} MB (resident now {} MB), over --max-memory-mb {}",
                settings.name,
                expected >> 20,
                now >> 20,
                max >> 20
            )));
        }
        Ok(())
    }

    /// A version whose load and warm-up took the process past the bound is dropped again.
    fn check_memory_after(&self, version: &Version) -> Result<(), LoadError> {
        let (Some(max), Some(now)) = (self.context.max_memory, super::memory::rss()) else {
            return Ok(());
        };
        if now > max {
            return Err(LoadError::Memory(format!(
                "model {:?}: after loading, {} MB are resident, over --max-memory-mb {}; the new version was dropped",
                version.settings.name,
                now >> 20,
                max >> 20
            )));
        }
        Ok(())
    }
}

fn task_noun(task: Task) -> &'static str {
    match task {
        Task::Detect => "detector",
        Task::Classify => "classifier",
    }
}

fn version_state(v: &Version, state: State, default: bool, draining: Vec<u64>) -> ModelState {
    ModelState {
        name: v.settings.name.clone(),
        task: Some(v.model.task()),
        default,
        state,
        version: Some(v.number),
        info: Some(v.model.info()),
        settings: v.settings.clone(),
        batching: v.model.batching(),
        precision_trial: v.model.precision_trial(),
        memory_bytes: v.model.memory_bytes(),
        pending: None,
        draining,
    }
}

fn slot_state(s: &Slot, draining: &[Arc<Version>]) -> ModelState {
    let old: Vec<u64> = draining
        .iter()
        .filter(|v| v.settings.name == s.name)
        .map(|v| v.number)
        .collect();
    match &s.serving {
        Some(v) => {
            let state = if v.model.ready() {
                State::Ready
            } else {
                State::Loading
            };
            let mut m = version_state(v, state, s.default, old);
            m.pending = s.pending.clone();
            m
        }
        None => {
            let pending = s.pending.clone();
            let state = pending.as_ref().map_or(State::Loading, |p| p.state);
            let settings = s.settings.clone();
            ModelState {
                name: s.name.clone(),
                task: s.task,
                default: s.default,
                state,
                version: None,
                info: None,
                batching: settings.batch,
                settings,
                precision_trial: None,
                memory_bytes: None,
                pending,
                draining: old,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gRPC edge shows `State::name`, the JSON edges serde's name: they must not differ.
    #[test]
    fn every_edge_names_a_state_alike() {
        for s in [State::Loading, State::Ready, State::Draining, State::Failed] {
            let json = serde_json::to_value(s).expect("serialize");
            assert_eq!(json.as_str(), Some(s.name()));
        }
    }
}
