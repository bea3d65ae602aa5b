//! Dynamic batching on a dedicated OS thread per model. Knows nothing of HTTP.
//!
//! Callers reserve room for a job's images in a queue bounded in images (before they spend
//! anything preparing them), then submit the job; a full queue, or a job larger than the whole
//! queue, is refused at once. The worker thread owns the model: it takes the first waiting
//! job, then more until `max_batch_size` images or `max_batch_delay` has passed, drops jobs
//! whose caller has gone (timed out or disconnected) before they reach the model, runs the
//! batch and answers each job on its own channel. A job larger than the engine takes in one
//! run goes in several runs, and stops between them once its caller has gone. A failing
//! batch fails only its own jobs. Each run takes a turn on the CPU shared with the other
//! models (`share`) and is timed (`pace`), so that the queue can say how long a new job would
//! wait.

mod pace;
mod share;

pub use pace::Pace;
pub use share::{CpuShare, Member};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::model::ModelError;

/// A model as the batcher sees it.
pub trait Engine: 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;
    /// One output per input, in order.
    fn run(&mut self, inputs: Vec<Self::Input>) -> Result<Vec<Self::Output>, ModelError>;

    /// Most images worth gathering into one run. An engine that runs images one by one
    /// anyway says 1, so that no job waits for the rest of a batch to be answered (one job
    /// with several images goes in several runs, and stops between them once its caller has
    /// gone).
    fn max_images_per_run(&self) -> usize {
        usize::MAX
    }

    /// The work one input is, in units the engine chooses (a detector: its padded input's
    /// pixels), for scaling a request's expected run time against the average input's.
    fn units(&self, _input: &Self::Input) -> u64 {
        1
    }

    /// Bytes of the largest tensor a run of `images` allocates in this process's heap (0 when
    /// the model runs elsewhere, on a GPU): what the heap keeps for the next run.
    fn largest_activation(&self, _images: usize) -> usize {
        0
    }
}

/// Which model version a queue serves, as its metrics and logs name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLabels {
    pub model: String,
    pub version: String,
}

impl ModelLabels {
    pub fn new(model: &str, version: u64) -> Self {
        Self {
            model: model.into(),
            version: version.to_string(),
        }
    }

    pub fn values(&self) -> [&str; 2] {
        [&self.model, &self.version]
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Images waiting, at most.
    pub max_queue: usize,
}

/// How long a job waited and how long its batch ran.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    pub queue: Duration,
    pub inference: Duration,
}

pub type Reply<O> = Result<(Vec<O>, Timing), ModelError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full")]
    QueueFull,
    #[error("a job of {images} images is larger than the queue ({max_queue} images)")]
    TooLarge { images: usize, max_queue: usize },
    #[error("the model worker has stopped")]
    Closed,
}

/// Room for a job's images in the queue, held from before its images are prepared until the
/// job is submitted; dropped unused, the room is given back.
pub struct Reservation<'a> {
    depth: &'a AtomicUsize,
    images: usize,
}

impl Reservation<'_> {
    pub fn images(&self) -> usize {
        self.images
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.depth.fetch_sub(self.images, Ordering::SeqCst);
    }
}

/// How long a worker waits without jobs before returning freed memory.
const IDLE: Duration = Duration::from_secs(1);

struct Job<I, O> {
    inputs: Vec<I>,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Reply<O>>,
    span: tracing::Span,
}

/// The submitting side of one model's queue. Dropping every clone stops the worker once the
/// queue is empty: that is the drain.
pub struct Batcher<I, O> {
    labels: ModelLabels,
    tx: Sender<Job<I, O>>,
    depth: Arc<AtomicUsize>,
    pace: Arc<Pace>,
    cpu: Option<Arc<Member>>,
    ready: Arc<AtomicBool>,
    config: BatchConfig,
    metrics: Arc<Metrics>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the worker thread, which builds the engine with `load` (loading weights and
    /// warming up belong there, on the thread that will own the model; it may record the
    /// warm-up's runs in the pace it is given), then serves, each run in a turn of `cpu`
    /// when the model shares the CPU. `started` receives the outcome of `load`.
    pub fn spawn<E, L>(
        labels: ModelLabels,
        config: BatchConfig,
        metrics: Arc<Metrics>,
        cpu: Option<Member>,
        load: L,
    ) -> (
        Self,
        oneshot::Receiver<Result<(), ModelError>>,
        JoinHandle<()>,
    )
    where
        E: Engine<Input = I, Output = O>,
        L: FnOnce(&Pace) -> Result<E, ModelError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let (started_tx, started_rx) = oneshot::channel();
        let cpu = cpu.map(Arc::new);
        let thread = format!("{}-v{}", labels.model, labels.version);
        let batcher = Self {
            labels: labels.clone(),
            tx,
            depth: Arc::default(),
            pace: Arc::default(),
            cpu: cpu.clone(),
            ready: Arc::default(),
            config,
            metrics,
        };
        let worker = Worker {
            labels,
            rx,
            depth: batcher.depth.clone(),
            pace: batcher.pace.clone(),
            cpu,
            config,
            metrics: batcher.metrics.clone(),
            carried: None,
            per_run: usize::MAX,
        };
        let ready = batcher.ready.clone();
        let handle = std::thread::Builder::new()
            .name(thread)
            .spawn(move || match load(&worker.pace) {
                Ok(engine) => {
                    ready.store(true, Ordering::SeqCst);
                    let _ = started_tx.send(Ok(()));
                    worker.serve(engine);
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
            })
            .expect("spawn model worker thread");
        (batcher, started_rx, handle)
    }

    pub fn labels(&self) -> &ModelLabels {
        &self.labels
    }

    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// Weights loaded and warm-up done.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// How long a job of `images` (of `units` work, see `Engine::units`; None: average ones)
    /// would wait for its answer if queued now (the images queued or reserved ahead of it,
    /// then its own), from the measured pace and the CPU's sharing with the models busy now;
    /// None before any run has been measured.
    pub fn expected_wait(&self, images: usize, units: Option<u64>) -> Option<Duration> {
        let ahead = self.depth.load(Ordering::SeqCst);
        expected_wait(&self.pace, self.cpu.as_deref(), ahead, images, units)
    }

    /// How long a job of `images` (of `units` work) takes with nothing ahead of it; None
    /// before any run has been measured.
    pub fn run_time(&self, images: usize, units: Option<u64>) -> Option<Duration> {
        self.pace.run_time(images, units)
    }

    /// Reserves room for `images` images. Refused at once when they would overfill the queue,
    /// and always when they are more than the whole queue holds.
    pub fn reserve(&self, images: usize) -> Result<Reservation<'_>, SubmitError> {
        let max_queue = self.config.max_queue;
        if images > max_queue {
            return Err(SubmitError::TooLarge { images, max_queue });
        }
        let before = self.depth.fetch_add(images, Ordering::SeqCst);
        // Constructed first, so that the refusal below gives the room back on drop.
        let reservation = Reservation {
            depth: &self.depth,
            images,
        };
        if before + images > max_queue {
            return Err(SubmitError::QueueFull);
        }
        self.metrics
            .queue_depth
            .with_label_values(&self.labels.values())
            .set((before + images) as i64);
        let wait = self.expected_wait(1, None);
        publish_expected_wait(&self.metrics, &self.labels, wait);
        Ok(reservation)
    }

    /// Reserves and queues a job at once.
    pub fn submit(
        &self,
        inputs: Vec<I>,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Reply<O>>, SubmitError> {
        let reservation = self.reserve(inputs.len())?;
        self.enqueue(reservation, inputs, deadline)
    }

    /// Queues a job in the room reserved for it; its answer arrives on the returned channel.
    /// The worker gives the room back when it takes the job.
    pub fn enqueue(
        &self,
        reservation: Reservation<'_>,
        inputs: Vec<I>,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Reply<O>>, SubmitError> {
        let n = inputs.len();
        // The worker subtracts what the job holds: settle a reservation of another size.
        let reserved = reservation.images;
        std::mem::forget(reservation);
        if n >= reserved {
            self.depth.fetch_add(n - reserved, Ordering::SeqCst);
        } else {
            self.depth.fetch_sub(reserved - n, Ordering::SeqCst);
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            inputs,
            enqueued: Instant::now(),
            deadline,
            reply,
            span: tracing::Span::current(),
        };
        self.tx.send(job).map_err(|_| {
            self.depth.fetch_sub(n, Ordering::SeqCst);
            SubmitError::Closed
        })?;
        Ok(rx)
    }
}

/// A job's answer channel, how long it waited, its span and its deadline.
type Waiting<O> = (oneshot::Sender<Reply<O>>, Duration, tracing::Span, Instant);

/// `images` more (of `units` work; None: average ones) behind `ahead`: the model's own CPU
/// time for them (its pace) stretched by the other models that share the CPU now.
fn expected_wait(
    pace: &Pace,
    cpu: Option<&Member>,
    ahead: usize,
    images: usize,
    units: Option<u64>,
) -> Option<Duration> {
    let own = pace.expected_wait(ahead, images, units)?;
    Some(own.mul_f64(cpu.map_or(1.0, Member::contention)))
}

/// What a new job of one image would wait, as the `detectd_expected_wait_seconds` gauge
/// (0 until a run has been measured).
fn publish_expected_wait(metrics: &Metrics, labels: &ModelLabels, wait: Option<Duration>) {
    metrics
        .expected_wait
        .with_label_values(&labels.values())
        .set(wait.unwrap_or_default().as_secs_f64());
}

/// Runs `inputs` through `guarded` at most `per_run` at a time, while `wanted` holds; also
/// returns how many inputs went through the engine.
fn run_in_parts<I, O>(
    inputs: Vec<I>,
    per_run: usize,
    wanted: impl Fn() -> bool,
    mut guarded: impl FnMut(Vec<I>) -> Result<Vec<O>, ModelError>,
) -> (Result<Vec<O>, ModelError>, usize) {
    let n = inputs.len();
    if n <= per_run {
        return (guarded(inputs), n);
    }
    let mut outputs = Vec::with_capacity(n);
    let mut rest = inputs.into_iter().peekable();
    while rest.peek().is_some() {
        if !wanted() {
            let left =
                ModelError::Inference("abandoned: the caller left before the job finished".into());
            return (Err(left), outputs.len());
        }
        let part: Vec<I> = rest.by_ref().take(per_run).collect();
        let size = part.len();
        match guarded(part) {
            Ok(out) => outputs.extend(out),
            Err(e) => return (Err(e), outputs.len() + size),
        }
    }
    (Ok(outputs), n)
}

struct Worker<I, O> {
    labels: ModelLabels,
    rx: Receiver<Job<I, O>>,
    depth: Arc<AtomicUsize>,
    pace: Arc<Pace>,
    /// Its turns on the CPU, when it shares it with other models.
    cpu: Option<Arc<Member>>,
    config: BatchConfig,
    metrics: Arc<Metrics>,
    /// A job that did not fit in the previous batch; it opens the next one.
    carried: Option<Job<I, O>>,
    /// Most images the engine takes in one run.
    per_run: usize,
}

impl<I, O> Worker<I, O> {
    fn serve<E: Engine<Input = I, Output = O>>(mut self, mut engine: E) {
        let limit = engine.max_images_per_run().max(1);
        self.per_run = limit;
        self.config.max_batch_size = self.config.max_batch_size.min(limit);
        self.pace.set_per_run(self.config.max_batch_size);
        self.publish_expected_wait();
        while let Some(batch) = self.next_batch() {
            self.run(&mut engine, batch);
        }
        tracing::info!(model = %self.labels.model, version = %self.labels.version, "queue drained, worker stopped");
    }

    /// Blocks for the next job; after a quiet second, first returns the freed memory of the
    /// last burst to the OS (it is kept while jobs keep coming, see `alloc`).
    fn wait_for_job(&self) -> Option<Job<I, O>> {
        match self.rx.recv_timeout(IDLE) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                crate::alloc::release_free_memory();
                self.rx.recv().ok()
            }
        }
    }

    /// Blocks for the first live job, then gathers more until the batch is full or the delay
    /// after the first has passed. None once every sender is gone and the queue is empty.
    fn next_batch(&mut self) -> Option<Vec<Job<I, O>>> {
        let first = match self.carried.take() {
            Some(job) => job,
            None => self.wait_for_job()?,
        };
        let until = Instant::now() + self.config.max_batch_delay;
        let mut images = first.inputs.len();
        let mut batch = vec![first];
        while images < self.config.max_batch_size {
            let job = match self
                .rx
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            };
            if images + job.inputs.len() > self.config.max_batch_size {
                self.carried = Some(job);
                break;
            }
            images += job.inputs.len();
            batch.push(job);
        }
        Some(batch)
    }

    fn run<E: Engine<Input = I, Output = O>>(&self, engine: &mut E, batch: Vec<Job<I, O>>) {
        let now = Instant::now();
        let queued: usize = batch.iter().map(|j| j.inputs.len()).sum();
        let left = self.depth.fetch_sub(queued, Ordering::SeqCst) - queued;
        self.metrics
            .queue_depth
            .with_label_values(&self.labels.values())
            .set(left as i64);
        // A caller that timed out or disconnected has dropped its receiver: skip its images.
        let live: Vec<Job<I, O>> = batch
            .into_iter()
            .filter(|j| !j.reply.is_closed() && j.deadline > now)
            .collect();
        if live.is_empty() {
            return;
        }
        let mut sizes = Vec::with_capacity(live.len());
        let mut inputs = Vec::new();
        let mut replies = Vec::with_capacity(live.len());
        for job in live {
            let waited = now - job.enqueued;
            self.metrics
                .queue_duration
                .with_label_values(&self.labels.values())
                .observe(waited.as_secs_f64());
            sizes.push(job.inputs.len());
            inputs.extend(job.inputs);
            replies.push((job.reply, waited, job.span, job.deadline));
        }
        let n = inputs.len();
        let span = tracing::info_span!("batch", model = %self.labels.model, version = %self.labels.version, images = n);
        // Only a batch of one job can hold more than a run takes (batches are gathered up to
        // the run size): it is wanted for as long as that job's caller waits.
        let wanted = || {
            replies
                .iter()
                .any(|(reply, _, _, deadline)| !reply.is_closed() && *deadline > Instant::now())
        };
        self.pace.take(n);
        let run = |part: Vec<I>| self.run_part(engine, part);
        let (result, ran) = span.in_scope(|| run_in_parts(inputs, self.per_run, wanted, run));
        self.pace.settle();
        let inference = now.elapsed();
        self.publish_expected_wait();
        self.metrics
            .inference_duration
            .with_label_values(&self.labels.values())
            .observe(inference.as_secs_f64());
        self.metrics
            .batch_size
            .with_label_values(&self.labels.values())
            .observe(n as f64);
        self.metrics
            .images
            .with_label_values(&self.labels.values())
            .inc_by(ran as u64);
        Self::answer(result, sizes, replies, inference);
    }

    fn publish_expected_wait(&self) {
        let depth = self.depth.load(Ordering::SeqCst);
        let wait = expected_wait(&self.pace, self.cpu.as_deref(), depth, 1, None);
        publish_expected_wait(&self.metrics, &self.labels, wait);
    }

    /// One run through the engine in the model's CPU turn, timed for the pace from the turn
    /// on (the pace is the model's own CPU time; sharing is counted when a wait is estimated).
    /// A panic in the engine fails these inputs only; the worker goes on serving.
    fn run_part<E: Engine<Input = I, Output = O>>(
        &self,
        engine: &mut E,
        part: Vec<I>,
    ) -> Result<Vec<O>, ModelError> {
        let images = part.len();
        let units = part.iter().map(|i| engine.units(i)).sum();
        let _turn = self.cpu.as_deref().map(Member::turn);
        let started = Instant::now();
        self.pace.started(images);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(part)))
            .unwrap_or_else(|_| Err(ModelError::Inference("the model panicked".into())));
        self.pace.record(images, units, started.elapsed());
        self.pace.finished();
        out
    }

    fn answer(
        result: Result<Vec<O>, ModelError>,
        sizes: Vec<usize>,
        replies: Vec<Waiting<O>>,
        inference: Duration,
    ) {
        match result {
            Ok(outputs) => {
                let mut outputs = outputs.into_iter();
                for ((reply, queue, _, _), size) in replies.into_iter().zip(sizes) {
                    let mine: Vec<O> = outputs.by_ref().take(size).collect();
                    let _ = reply.send(Ok((mine, Timing { queue, inference })));
                }
            }
            Err(e) => {
                for (reply, _, span, _) in replies {
                    span.in_scope(|| tracing::error!(error = %e, "batch failed"));
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubles numbers; panics on 13 and fails on 7, to exercise batch failures.
    struct Doubler;

    impl Engine for Doubler {
        type Input = i32;
        type Output = i32;
        fn run(&mut self, inputs: Vec<i32>) -> Result<Vec<i32>, ModelError> {
            if inputs.contains(&13) {
                panic!("unlucky");
            }
            if inputs.contains(&7) {
                return Err(ModelError::Inference("seven".into()));
            }
            Ok(inputs.into_iter().map(|x| x * 2).collect())
        }
    }

    fn batcher(max_queue: usize) -> (Batcher<i32, i32>, JoinHandle<()>) {
        let config = BatchConfig {
            max_batch_size: 4,
            max_batch_delay: Duration::from_millis(20),
            max_queue,
        };
        let (b, started, handle) = Batcher::spawn(
            ModelLabels::new("test", 1),
            config,
            Arc::new(Metrics::new()),
            None,
            |_| Ok(Doubler),
        );
        assert!(started.blocking_recv().expect("started").is_ok());
        (b, handle)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn a_failing_batch_fails_its_jobs_and_the_worker_keeps_serving() {
        let (b, handle) = batcher(16);
        let bad = b.submit(vec![13], far()).expect("submit");
        assert!(bad.blocking_recv().expect("reply").is_err());
        let bad = b.submit(vec![7], far()).expect("submit");
        assert!(bad.blocking_recv().expect("reply").is_err());
        let good = b.submit(vec![1, 2], far()).expect("submit");
        assert_eq!(
            good.blocking_recv().expect("reply").expect("ok").0,
            vec![2, 4]
        );
        drop(b);
        handle
            .join()
            .expect("worker stops when the batcher is dropped");
    }

    #[test]
    fn jobs_share_batches_and_get_their_own_outputs() {
        let (b, _handle) = batcher(16);
        let rxs: Vec<_> = (0..3)
            .map(|i| b.submit(vec![i, 10 + i], far()).expect("submit"))
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let i = i as i32;
            assert_eq!(
                rx.blocking_recv().expect("reply").expect("ok").0,
                vec![2 * i, 2 * (10 + i)]
            );
        }
    }

    /// Records how many images each run got; runs images one by one.
    struct OneByOne(Arc<std::sync::Mutex<Vec<usize>>>);

    impl Engine for OneByOne {
        type Input = i32;
        type Output = i32;
        fn run(&mut self, inputs: Vec<i32>) -> Result<Vec<i32>, ModelError> {
            std::thread::sleep(Duration::from_millis(20));
            self.0.lock().expect("runs").push(inputs.len());
            Ok(inputs)
        }
        fn max_images_per_run(&self) -> usize {
            1
        }
    }

    #[test]
    fn an_engine_that_runs_images_one_by_one_gets_one_job_per_run() {
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let config = BatchConfig {
            max_batch_size: 8,
            max_batch_delay: Duration::from_millis(200),
            max_queue: 16,
        };
        let engine = OneByOne(runs.clone());
        let (b, started, _handle) = Batcher::spawn(
            ModelLabels::new("one", 1),
            config,
            Arc::new(Metrics::new()),
            None,
            move |_| Ok(engine),
        );
        assert!(started.blocking_recv().expect("started").is_ok());
        let jobs = [vec![1], vec![2, 3], vec![4], vec![5]];
        let rxs: Vec<_> = jobs
            .iter()
            .map(|j| b.submit(j.clone(), far()).expect("submit"))
            .collect();
        for (rx, job) in rxs.into_iter().zip(&jobs) {
            assert_eq!(&rx.blocking_recv().expect("reply").expect("ok").0, job);
        }
        // The job of two images goes in two runs (its caller is asked about between them).
        assert_eq!(*runs.lock().expect("runs"), vec![1, 1, 1, 1, 1]);
    }

    #[test]
    fn reserved_room_counts_until_it_is_used_or_dropped() {
        let (b, _handle) = batcher(4);
        assert_eq!(
            b.reserve(5).err(),
            Some(SubmitError::TooLarge {
                images: 5,
                max_queue: 4
            })
        );
        let r = b.reserve(3).expect("room for 3");
        assert_eq!(b.reserve(2).err(), Some(SubmitError::QueueFull));
        drop(r);
        let r = b.reserve(4).expect("room again once dropped");
        let rx = b.enqueue(r, vec![1, 2, 3, 4], far()).expect("enqueue");
        assert_eq!(
            rx.blocking_recv().expect("reply").expect("ok").0,
            vec![2, 4, 6, 8]
        );
        let r = b.reserve(4).expect("the worker gave the room back");
        drop(r);
    }

    #[test]
    fn a_job_larger_than_a_run_stops_once_its_caller_has_gone() {
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let config = BatchConfig {
            max_batch_size: 8,
            max_batch_delay: Duration::from_millis(1),
            max_queue: 16,
        };
        let engine = OneByOne(runs.clone());
        let (b, started, _handle) = Batcher::spawn(
            ModelLabels::new("parts", 1),
            config,
            Arc::new(Metrics::new()),
            None,
            move |_| Ok(engine),
        );
        assert!(started.blocking_recv().expect("started").is_ok());
        // Whole when its caller waits: ten runs of one image.
        let rx = b.submit((0..10).collect(), far()).expect("submit");
        assert_eq!(rx.blocking_recv().expect("reply").expect("ok").0.len(), 10);
        assert_eq!(runs.lock().expect("runs").len(), 10);
        // Past its deadline after ~2 runs of 20 ms: the rest never runs.
        let deadline = Instant::now() + Duration::from_millis(50);
        let rx = b.submit((0..10).collect(), deadline).expect("submit");
        assert!(rx.blocking_recv().expect("reply").is_err());
        let ran = runs.lock().expect("runs").len() - 10;
        assert!((1..=4).contains(&ran), "{ran} runs after the deadline");
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_expired_jobs_are_skipped() {
        let (b, _handle) = batcher(2);
        let expired = b.submit(vec![1, 2], Instant::now()).expect("submit");
        // Either the worker already took the expired job or the queue is full.
        match b.submit(vec![3], far()) {
            Err(SubmitError::QueueFull) => {}
            Ok(rx) => assert!(rx.blocking_recv().expect("reply").is_ok()),
            Err(e) => panic!("{e}"),
        }
        assert!(
            expired.blocking_recv().is_err(),
            "an expired job is dropped unanswered"
        );
    }
}
