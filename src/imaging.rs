//! Image decoding: JPEG, PNG, WebP, BMP, GIF (first frame), TIFF → RGB8 with the EXIF
//! orientation applied, and a header-only probe of the size (so a decompression bomb is
//! refused before any pixel memory is taken).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader};
use tch::Tensor;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    #[error("empty image")]
    Empty,
    #[error("unsupported or unrecognized image format")]
    Format,
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit}")]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
}

/// A decoded image: `[3, H, W]` uint8 on the CPU.
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub tensor: Tensor,
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let r = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    if r.format().is_none() {
        return Err(ImageError::Format);
    }
    Ok(r)
}

/// Width and height from the header alone.
pub fn probe(bytes: &[u8]) -> Result<(u32, u32), ImageError> {
    reader(bytes)?
        .into_dimensions()
        .map_err(|e| ImageError::Decode(e.to_string()))
}

/// Decodes to RGB8, refusing images over `max_pixels` from their header.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageError> {
    let pixels = decode_pixels(bytes, max_pixels)?;
    let (width, height) = pixels.dimensions();
    let hwc = hwc_tensor(&pixels)?;
    // The pixel buffer goes before the reordered copy is made: two copies at the peak, not three.
    drop(pixels);
    chw(hwc, width, height)
}

/// Decodes to an RGB8 pixel buffer (EXIF orientation applied), for drawing on.
pub fn decode_pixels(bytes: &[u8], max_pixels: u64) -> Result<image::RgbImage, ImageError> {
    let (width, height) = probe(bytes)?;
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    let reader = reader(bytes)?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        return Err(ImageError::Decode(
            "truncated JPEG: no end-of-image marker after the last scan".into(),
        ));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Decode(e.to_string()))?;
    img.apply_orientation(orientation);
    // into_: an image decoded as RGB8 already is moved, not copied.
    Ok(img.into_rgb8())
}

/// The `[3, H, W]` uint8 tensor of a pixel buffer.
pub fn to_tensor(rgb: &image::RgbImage) -> Result<RgbImage, ImageError> {
    let (width, height) = rgb.dimensions();
    chw(hwc_tensor(rgb)?, width, height)
}

fn tensor_error(e: tch::TchError) -> ImageError {
    ImageError::Decode(format!("cannot hold the pixels: {e}"))
}

/// A copy of the pixels as an `[H, W, 3]` tensor.
fn hwc_tensor(rgb: &image::RgbImage) -> Result<Tensor, ImageError> {
    let (w, h) = rgb.dimensions();
    Tensor::f_from_slice(rgb.as_raw())
        .and_then(|t| t.f_view([i64::from(h), i64::from(w), 3]))
        .map_err(tensor_error)
}

fn chw(hwc: Tensor, width: u32, height: u32) -> Result<RgbImage, ImageError> {
    let tensor = hwc
        .f_permute([2, 0, 1])
        .and_then(|t| t.f_contiguous())
        .map_err(tensor_error)?;
    Ok(RgbImage {
        width,
        height,
        tensor,
    })
}

/// The JPEG decoder pads a truncated scan with grey instead of failing; a complete file has an
/// end-of-image marker (FF D9) after its last start-of-scan (FF DA). Neither pair can occur
/// inside entropy-coded data, where every FF byte is stuffed.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xff, 0xda]);
    match last_scan {
        Some(at) => bytes[at..].windows(2).any(|w| w == [0xff, 0xd9]),
        None => false,
    }
}
