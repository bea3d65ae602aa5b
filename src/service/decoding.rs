//! The decoding budget: how many pixels are being decoded and prepared at once, across every
//! request. Decoding is where a small file becomes large memory (a 150 KB PNG can hold 45
//! megapixels), so images wait here for room instead of multiplying memory on tokio's 512
//! blocking threads; each counts its own pixels plus those of its resized copy, known from
//! the header before any pixel is decoded.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{Decoded, Preparer, ServiceError};
use crate::imaging::{self, ImageError};
use crate::model::ModelError;

/// Permits count kilopixels, so that a budget of billions of pixels fits the semaphore's u32.
const PIXELS_PER_PERMIT: u64 = 1024;

pub struct Decoding {
    permits: Arc<Semaphore>,
    budget: u32,
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
        }
    }

    /// Pixels being decoded now, for tests and metrics.
    pub fn in_use(&self) -> u64 {
        (self.budget as u64 - self.permits.available_permits() as u64) * PIXELS_PER_PERMIT
    }

    /// Checks image `index` from its header, waits (until `deadline`) for room to decode it,
    /// then decodes and prepares it on the blocking pool.
    pub(crate) async fn prepare<I: Send + 'static>(
        &self,
        index: usize,
        bytes: Bytes,
        max_pixels: u64,
        deadline: Instant,
        preparer: &Preparer<I>,
    ) -> Result<(Decoded, I), ServiceError> {
        let image_error = move |source| ServiceError::Image { index, source };
        let (w, h) = imaging::probe(&bytes).map_err(image_error)?;
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
        let cost = pixels.saturating_add((preparer.resized_pixels)(h, w));
        let prepare = preparer.prepare.clone();
        self.run(cost, deadline, move || {
            let img = imaging::decode(&bytes, max_pixels).map_err(image_error)?;
            let input = prepare(&img)?;
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
            work()
        })
        .await
        .map_err(|e| ModelError::Inference(format!("decoding task failed: {e}")))?;
        Ok(done)
    }
}
