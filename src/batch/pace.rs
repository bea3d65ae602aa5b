//! A model's measured pace: how long its runs take, as moving averages by run size, so that a
//! request can be told before anything is decoded whether it would be answered in time. A
//! request's own runs are scaled by its work (the engine's units: a detector's padded input
//! pixels) against the average image's, so a thin strip is not taken for a full-size photo.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Weight of the newest run in the moving average: a few runs follow a change of load (another
/// model taking turns, a new precision) without one slow run swinging the estimate.
const ALPHA: f64 = 0.3;

/// How far a request's own work may scale its runs from the average image's: a pass has costs
/// that do not shrink with the image (the RoI heads), and none grows past the resize's bound.
const SCALE: (f64, f64) = (0.25, 4.0);

#[derive(Default)]
pub struct Pace {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Seconds a run took from its CPU turn on, by images in the run.
    by_size: BTreeMap<usize, f64>,
    /// The run in progress: when it started and how long it is expected to take.
    running: Option<(Instant, f64)>,
    /// Images the worker has taken from the queue for runs not started yet (a job of several
    /// images on an engine that runs one at a time).
    held: usize,
    /// Most images the worker puts in one run.
    per_run: usize,
    /// Moving average of the engine's units of work per image.
    units_per_image: Option<f64>,
}

impl Pace {
    /// The worker's run size, once it knows its engine.
    pub fn set_per_run(&self, per_run: usize) {
        self.lock().per_run = per_run.max(1);
    }

    /// A run of `images` images, `units` of work in all, took `took`.
    pub fn record(&self, images: usize, units: u64, took: Duration) {
        if images == 0 {
            return;
        }
        let mut inner = self.lock();
        let per_image = units as f64 / images as f64;
        inner.units_per_image = Some(
            inner
                .units_per_image
                .map_or(per_image, |avg| avg + ALPHA * (per_image - avg)),
        );
        let s = took.as_secs_f64();
        inner
            .by_size
            .entry(images)
            .and_modify(|avg| *avg += ALPHA * (s - *avg))
            .or_insert(s);
    }

    /// The worker took `images` from the queue for its next runs.
    pub fn take(&self, images: usize) {
        self.lock().held = images;
    }

    /// A run of `images` starts now (until `finished`).
    pub fn started(&self, images: usize) {
        let mut inner = self.lock();
        inner.held = inner.held.saturating_sub(images);
        let expected = inner.run_seconds(images).unwrap_or(0.0);
        inner.running = Some((Instant::now(), expected));
    }

    pub fn finished(&self) {
        self.lock().running = None;
    }

    /// The batch is over: whatever it still held will not run.
    pub fn settle(&self) {
        let mut inner = self.lock();
        inner.held = 0;
        inner.running = None;
    }

    /// Whether any run has been measured (before that nothing is estimated, and all is admitted).
    pub fn is_known(&self) -> bool {
        !self.lock().by_size.is_empty()
    }

    /// Seconds until `images` more images of `units` work (None: average ones), queued behind
    /// `ahead`, would be answered: what is left of the run in progress, the runs of those
    /// ahead (average images), then their own. None before any run is measured.
    pub fn expected_wait(
        &self,
        ahead: usize,
        images: usize,
        units: Option<u64>,
    ) -> Option<Duration> {
        let inner = self.lock();
        let queued = inner.queue_seconds(inner.held + ahead)?;
        let own = inner.own_seconds(images, units)?;
        let running = inner.running.map_or(0.0, |(since, expected)| {
            (expected - since.elapsed().as_secs_f64()).max(0.0)
        });
        Some(Duration::from_secs_f64(queued + own + running))
    }

    /// Seconds `images` of `units` work (None: average ones) take with nothing ahead of them.
    pub fn run_time(&self, images: usize, units: Option<u64>) -> Option<Duration> {
        let seconds = self.lock().own_seconds(images, units)?;
        Some(Duration::from_secs_f64(seconds))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// One run of `images`: its own average, else scaled per image from the nearest size
    /// measured.
    fn run_seconds(&self, images: usize) -> Option<f64> {
        if let Some(s) = self.by_size.get(&images) {
            return Some(*s);
        }
        let below = self.by_size.range(..images).next_back();
        let above = self.by_size.range(images..).next();
        let (&size, &s) = match (below, above) {
            (Some(b), Some(a)) => {
                if images - b.0 <= a.0 - images {
                    b
                } else {
                    a
                }
            }
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => return None,
        };
        Some(s / size as f64 * images as f64)
    }

    /// A request's own runs: average images' runs, scaled by its work against theirs.
    fn own_seconds(&self, images: usize, units: Option<u64>) -> Option<f64> {
        let seconds = self.queue_seconds(images)?;
        let scale = match (units, self.units_per_image) {
            (Some(units), Some(avg)) if avg > 0.0 && images > 0 => {
                (units as f64 / (images as f64 * avg)).clamp(SCALE.0, SCALE.1)
            }
            _ => 1.0,
        };
        Some(seconds * scale)
    }

    /// `images` in full runs of the worker's size and one of the rest.
    fn queue_seconds(&self, images: usize) -> Option<f64> {
        if self.by_size.is_empty() {
            return None;
        }
        let per_run = self.per_run.max(1);
        let (full, rest) = (images / per_run, images % per_run);
        let mut s = 0.0;
        if full > 0 {
            s += full as f64 * self.run_seconds(per_run)?;
        }
        if rest > 0 {
            s += self.run_seconds(rest)?;
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: Option<Duration>) -> f64 {
        d.expect("estimate").as_secs_f64()
    }

    #[test]
    fn nothing_is_estimated_before_a_run_is_measured() {
        let pace = Pace::default();
        pace.set_per_run(1);
        assert_eq!(pace.expected_wait(3, 1, Some(1)), None);
        assert!(!pace.is_known());
    }

    #[test]
    fn the_wait_counts_runs_of_the_workers_size() {
        let pace = Pace::default();
        pace.set_per_run(4);
        pace.record(4, 4, Duration::from_secs(2));
        // 9 images: two runs of 4 (2 s each) and one of 1 (scaled: 0.5 s).
        assert!((secs(pace.expected_wait(8, 1, Some(1))) - 4.5).abs() < 1e-9);
        pace.record(1, 1, Duration::from_secs(1));
        assert!((secs(pace.expected_wait(8, 1, Some(1))) - 5.0).abs() < 1e-9);
    }

    #[test]
    fn the_average_moves_with_new_runs() {
        let pace = Pace::default();
        pace.set_per_run(1);
        pace.record(1, 1, Duration::from_secs(1));
        pace.record(1, 1, Duration::from_secs(2));
        assert!((secs(pace.expected_wait(0, 1, Some(1))) - 1.3).abs() < 1e-9);
    }

    #[test]
    fn a_run_in_progress_adds_what_is_left_of_it() {
        let pace = Pace::default();
        pace.set_per_run(1);
        pace.record(1, 1, Duration::from_secs(10));
        pace.started(1);
        let wait = secs(pace.expected_wait(0, 1, Some(1)));
        assert!(wait > 19.0 && wait <= 20.0, "{wait}");
        pace.finished();
        assert!((secs(pace.expected_wait(0, 1, Some(1))) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn images_taken_for_later_runs_still_count() {
        let pace = Pace::default();
        pace.set_per_run(1);
        pace.record(1, 1, Duration::from_secs(1));
        pace.take(3);
        pace.started(1);
        pace.finished();
        assert!((secs(pace.expected_wait(0, 1, Some(1))) - 3.0).abs() < 1e-9);
        pace.settle();
        assert!((secs(pace.expected_wait(0, 1, Some(1))) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_requests_own_runs_scale_with_its_work() {
        let pace = Pace::default();
        pace.set_per_run(1);
        pace.record(1, 100, Duration::from_secs(2));
        assert!((secs(pace.expected_wait(0, 1, Some(50))) - 1.0).abs() < 1e-9);
        // Bounded both ways: a pass has fixed costs, and no image is larger than the resize.
        assert!((secs(pace.expected_wait(0, 1, Some(1))) - 0.5).abs() < 1e-9);
        assert!((secs(pace.run_time(1, Some(1000))) - 8.0).abs() < 1e-9);
        // Those ahead count as average images.
        assert!((secs(pace.expected_wait(2, 1, Some(50))) - 5.0).abs() < 1e-9);
    }
}
