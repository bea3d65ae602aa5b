//! Entry points for the fuzz targets in `fuzz/` and for the test that replays their committed
//! corpora on stable Rust (`tests/it/fuzz_corpus.rs`). Each takes arbitrary bytes and must return
//! without panicking, looping or allocating without bound; errors are the expected outcome.
#![doc(hidden)]

use axum::http::{header, HeaderMap, HeaderValue};

use crate::http::input::{self, ClassifyParams, DetectParams};
use crate::imaging;
use crate::labels::Labels;
use crate::model::transform::DetectorResize;
use crate::model::Preset;
use crate::service::{ClassifyInput, DetectInput};

/// Pixels an image may declare: small enough that a fuzzer run stays fast, large enough for
/// every decoder path.
const MAX_PIXELS: u64 = 1 << 20;

/// A `torch.save` file (zip or legacy pickle), as `detectd` reads downloaded checkpoints.
pub fn checkpoint(bytes: &[u8]) {
    let _ = crate::weights::read_torch_bytes(bytes);
}

/// An image body: decoded, then prepared for both models.
pub fn image(bytes: &[u8]) {
    let Ok(img) = imaging::decode(bytes, MAX_PIXELS) else {
        return;
    };
    let _ = DetectInput::new(
        &img,
        DetectorResize::default(),
        crate::model::detector::BOX_SCORE_THRESH,
        Some(crate::model::detector::MASK_THRESHOLD),
    );
    let _ = ClassifyInput::new(&img, Preset::V2, 5);
}

/// A request body. The first byte picks the content type, the rest is the body.
pub fn http_body(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = match selector % 4 {
        0 => "image/png",
        1 => "application/json",
        2 => "multipart/form-data; boundary=X",
        _ => "multipart/form-data; boundary=\"a b\"",
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let body = axum::body::Body::from(body.to_vec());
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    runtime.block_on(async {
        let limits = input::Limits::for_fuzzing();
        if selector & 4 == 0 {
            let _ = input::read(&headers, body, DetectParams::default(), &limits).await;
        } else {
            let _ = input::read(&headers, body, ClassifyParams::default(), &limits).await;
        }
    });
}

/// A labels file, checked against a model of 91 classes.
pub fn labels(text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    let _ = Labels::from_text(&text, 91, "fuzz");
}
