//! The decoding budget: how many pixels are being decoded and prepared at once, across every
//! request. Decoding is where a small file becomes large memory (a 150 KB PNG can hold 45
//! megapixels), so images wait here for room instead of multiplying memory on tokio's 512
//! blocking threads; each counts its own pixels plus those of its resized copy, known from
//! the header before any pixel is decoded. It also measures its pace (seconds per pixel), so
//! admission can tell how long the images waiting ahead will take to decode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::{Decoded, Preparer, ServiceError};
use crate::imaging::{ImageError, ImageInput};
use crate::model::ModelError;

/// Permits count kilopixels, so that a budget of billions of pixels fits the semaphore's u32.
const PIXELS_PER_PERMIT: u64 = 1024;

pub struct Decoding {
    permits: Arc<Semaphore>,
    budget: u32,
    /// Pixels waiting for room or being decoded.
    queued: Arc<AtomicU64>,
    /// Moving average of seconds per pixel of decoding and preparing (None before the first).
    pace: Arc<Mutex<Option<f64>>>,
}

/// What images cost: pixels of the decoding budget (their own and their resized copies'), and
/// the model's units of work (`Engine::units`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub pixels: u64,
    pub units: u64,
}

impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, other: Self) {
        self.pixels = self.pixels.saturating_add(other.pixels);
        self.units = self.units.saturating_add(other.units);
    }
}

/// Decoding's pace before the first image has been measured. A burst's requests arrive
/// together, before any of them is decoded: priced at nothing, a server admitted work it could
/// not finish in time (32 clients of 45-megapixel PNGs: 18 admitted, 3 of them answered 504
/// at 60 s, on a 2-core Zen 3). A 45 MP PNG took 0.71-0.84 s to decode and prepare for the
/// detector there, 16-18 ns a pixel, alone; slower beside a model's pass. The first
/// measurement replaces this.
const PRIOR_SECONDS_PER_PIXEL: f64 = 25e-9;

/// Weight of the newest image in the moving average.
const ALPHA: f64 = 0.3;

/// Images smaller than this are timed as if they had this many pixels: their time is mostly
/// fixed costs, which would otherwise price a large image's pixels far too high.
const PACE_MIN_PIXELS: u64 = 1 << 20;

/// Adds an image of `pixels` that took `took` to decode and prepare to the moving average.
fn record(pace: &Mutex<Option<f64>>, pixels: u64, took: Duration) {
    let per_pixel = took.as_secs_f64() / pixels.max(PACE_MIN_PIXELS) as f64;
    let mut avg = pace.lock().unwrap_or_else(|e| e.into_inner());
    *avg = Some(avg.map_or(per_pixel, |a| a + ALPHA * (per_pixel - a)));
}

/// Takes its pixels back out of the queued count however the work ends (done, refused, or its
/// request dropped while it waited).
struct Queued {
    queued: Arc<AtomicU64>,
    pixels: u64,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.pixels, Ordering::SeqCst);
    }
}

impl Decoding {
    /// At most `max_pixels` pixels decoded and prepared at once.
    pub fn new(max_pixels: u64) -> Self {
        let budget = u32::try_from(max_pixels.div_ceil(PIXELS_PER_PERMIT))
            .unwrap_or(u32::MAX)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize) as u32);
        Self {
            permits: Arc::new(Semaphore::new(budget as usize)),
            budget,
            queued: Arc::default(),
            pace: Arc::default(),
        }
    }

    /// How long until images of `pixels` more pixels, behind those queued now, would be
    /// decoded and prepared, at the measured pace (one at a time: the model's worker needs
    /// the other cores), or at `PRIOR_SECONDS_PER_PIXEL` before any image has been measured.
    pub fn expected_wait(&self, pixels: u64) -> Duration {
        self.expected_wait_alone(self.queued.load(Ordering::SeqCst) + pixels)
    }

    /// How long images of `pixels` pixels take to decode and prepare on an idle server.
    pub fn expected_wait_alone(&self, pixels: u64) -> Duration {
        let measured = *self.pace.lock().unwrap_or_else(|e| e.into_inner());
        let per_pixel = measured.unwrap_or(PRIOR_SECONDS_PER_PIXEL);
        Duration::from_secs_f64(pixels as f64 * per_pixel)
    }

    /// What image `index` costs, from its header alone: refused here when it is too large or
    /// unusable for the model.
    pub(crate) fn cost<I>(
        &self,
        index: usize,
        image: &ImageInput,
        max_pixels: u64,
        preparer: &Preparer<I>,
    ) -> Result<Cost, ServiceError> {
        let image_error = move |source| ServiceError::Image { index, source };
        let (w, h) = image.size().map_err(image_error)?;
        let pixels = u64::from(w) * u64::from(h);
        if pixels > max_pixels {
            return Err(image_error(ImageError::TooLarge {
                width: w,
                height: h,
                pixels,
                limit: max_pixels,
            }));
        }
        let (h, w) = (i64::from(h), i64::from(w));
        (preparer.check)(h, w).map_err(|e| ServiceError::Unusable {
            index,
            reason: e.to_string(),
        })?;
        Ok(Cost {
            pixels: pixels.saturating_add((preparer.resized_pixels)(h, w)),
            units: (preparer.units)(h, w),
        })
    }

    /// Pixels being decoded now, for tests and metrics.
    pub fn in_use(&self) -> u64 {
        (self.budget as u64 - self.permits.available_permits() as u64) * PIXELS_PER_PERMIT
    }

    /// Waits (until `deadline`) for room to decode image `index`, whose `cost` was read from
    /// its header, then decodes and prepares it on the blocking pool.
    pub(crate) async fn prepare<I: Send + 'static>(
        &self,
        index: usize,
        image: ImageInput,
        cost: u64,
        max_pixels: u64,
        deadline: Instant,
        preparer: &Preparer<I>,
    ) -> Result<(Decoded, I), ServiceError> {
        let image_error = move |source| ServiceError::Image { index, source };
        let prepare = preparer.prepare.clone();
        let pace = self.pace.clone();
        self.run(cost, deadline, move || {
            let started = Instant::now();
            let img = image.decode(max_pixels).map_err(image_error)?;
            let input = prepare(&img)?;
            record(&pace, cost, started.elapsed());
            let size = Decoded {
                width: img.width,
                height: img.height,
            };
            Ok((size, input))
        })
        .await?
    }

    /// Runs `work`, which holds about `pixels` pixels in memory, on the blocking pool once the
    /// budget has room for them (waiting until `deadline`).
    pub async fn run<T: Send + 'static>(
        &self,
        pixels: u64,
        deadline: Instant,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ServiceError> {
        let queued = Queued {
            queued: self.queued.clone(),
            pixels,
        };
        self.queued.fetch_add(pixels, Ordering::SeqCst);
        // One image larger than the whole budget takes all of it rather than waiting forever.
        let units = u32::try_from(pixels.div_ceil(PIXELS_PER_PERMIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.budget);
        let permit = tokio::time::timeout_at(
            deadline.into(),
            self.permits.clone().acquire_many_owned(units),
        )
        .await
        .map_err(|_| ServiceError::Timeout)?
        .map_err(|_| ModelError::Inference("the decoding budget is closed".into()))?;
        // The permit moves with the work: it is held until the work ends even when the
        // request is dropped meanwhile, so the budget counts every pixel really in memory.
        let done = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _queued = queued;
            work()
        })
        .await
        .map_err(|e| ModelError::Inference(format!("decoding task failed: {e}")))?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image that waits for room past its request's deadline is refused with `Timeout`
    /// (the edges' 504 `timeout`, gRPC DEADLINE_EXCEEDED) without being decoded, and the
    /// budget is whole again once the work holding it ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_room_past_the_deadline_is_a_timeout() {
        let decoding = Arc::new(Decoding::new(2048));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let holder = decoding.clone();
        let far = Instant::now() + Duration::from_secs(60);
        let first = tokio::spawn(async move {
            holder
                .run(2048, far, move || {
                    let _ = hold.recv();
                })
                .await
        });
        let until = Instant::now() + Duration::from_secs(10);
        while decoding.in_use() < 2048 {
            assert!(
                Instant::now() < until,
                "the first image never took the budget"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let soon = Instant::now() + Duration::from_millis(50);
        let refused = decoding.run(1024, soon, || unreachable!("decoded past its deadline"));
        assert!(matches!(refused.await, Err(ServiceError::Timeout)));
        release.send(()).expect("release the first image");
        first.await.expect("task").expect("the first image ran");
        assert_eq!(decoding.in_use(), 0);
        assert_eq!(decoding.run(2048, far, || 7).await.expect("room again"), 7);
    }

    /// Before any image is measured, decoding is priced at the prior, not at nothing (a
    /// burst arrives before its first image is decoded); the first measurement replaces it.
    #[test]
    fn decoding_is_priced_before_the_first_image_is_measured() {
        let decoding = Decoding::new(64_000_000);
        let prior = decoding.expected_wait_alone(40_000_000);
        assert_eq!(prior, Duration::from_secs(1));
        record(&decoding.pace, 40_000_000, Duration::from_secs(2));
        let measured = decoding.expected_wait_alone(40_000_000);
        assert_eq!(measured, Duration::from_secs(2));
    }
}
