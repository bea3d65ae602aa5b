//! Image decoding: JPEG, PNG, WebP, BMP, GIF (first frame), TIFF → RGB8 with the EXIF
//! orientation applied, and a header-only probe of the size (so a decompression bomb is
//! refused before any pixel memory is taken). Raw RGB8 pixels are taken as they are.

use std::io::Cursor;

use bytes::Bytes;
use image::{DynamicImage, ImageDecoder, ImageReader};
use tch::Tensor;

/// One image as an edge received it.
#[derive(Clone, Debug)]
pub enum ImageInput {
    /// A file in one of the formats above.
    Encoded(Bytes),
    /// Raw pixels, row by row, three bytes (R, G, B) each: what a protocol that carries
    /// tensors sends (the Open Inference Protocol's `UINT8` `[H, W, 3]`).
    Rgb8 {
        width: u32,
        height: u32,
        pixels: Bytes,
    },
}

impl From<Bytes> for ImageInput {
    fn from(bytes: Bytes) -> Self {
        ImageInput::Encoded(bytes)
    }
}

impl From<Vec<u8>> for ImageInput {
    fn from(bytes: Vec<u8>) -> Self {
        ImageInput::Encoded(bytes.into())
    }
}

impl ImageInput {
    /// Width and height, from the header alone (or as given, once the pixels are checked to
    /// be that many).
    pub fn size(&self) -> Result<(u32, u32), ImageError> {
        match self {
            ImageInput::Encoded(bytes) => probe(bytes),
            ImageInput::Rgb8 {
                width,
                height,
                pixels,
            } => rgb8_size(*width, *height, pixels.len()),
        }
    }

    /// The image as a `[3, H, W]` tensor, refused over `max_pixels` before any is decoded.
    pub fn decode(&self, max_pixels: u64) -> Result<RgbImage, ImageError> {
        match self {
            ImageInput::Encoded(bytes) => decode(bytes, max_pixels),
            ImageInput::Rgb8 {
                width,
                height,
                pixels,
            } => {
                let (w, h) = rgb8_size(*width, *height, pixels.len())?;
                within(w, h, max_pixels)?;
                let hwc = Tensor::f_from_slice(pixels)
                    .and_then(|t| t.f_view([i64::from(h), i64::from(w), 3]))
                    .map_err(tensor_error)?;
                chw(hwc, w, h)
            }
        }
    }
}

/// Raw RGB8 must hold exactly `width × height × 3` bytes.
fn rgb8_size(width: u32, height: u32, bytes: usize) -> Result<(u32, u32), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Empty);
    }
    let expected = u64::from(width) * u64::from(height) * 3;
    if bytes as u64 != expected {
        return Err(ImageError::Decode(format!(
            "{width}x{height} RGB8 pixels are {expected} bytes; {bytes} were given"
        )));
    }
    Ok((width, height))
}

/// Refuses a `width × height` image over `max_pixels`.
fn within(width: u32, height: u32, max_pixels: u64) -> Result<(), ImageError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    Ok(())
}

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
    within(width, height, max_pixels)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG of `w × h` varied pixels, with those pixels.
    fn png_and_pixels(w: u32, h: u32) -> (Bytes, Vec<u8>) {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        });
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        (png.into(), img.into_raw())
    }

    /// Raw pixels are the image the same pixels encoded as a file decode to, tensor for tensor:
    /// whatever an edge receives, the model gets the same input.
    #[test]
    fn raw_rgb8_is_the_decoded_file() {
        let (png, pixels) = png_and_pixels(37, 21);
        let raw = ImageInput::Rgb8 {
            width: 37,
            height: 21,
            pixels: pixels.into(),
        };
        let file = ImageInput::from(png);
        assert_eq!(raw.size().expect("raw size"), (37, 21));
        assert_eq!(file.size().expect("file size"), (37, 21));
        let (a, b) = (
            raw.decode(u64::MAX).expect("raw"),
            file.decode(u64::MAX).expect("png"),
        );
        assert_eq!((a.width, a.height), (b.width, b.height));
        assert_eq!(a.tensor.size(), [3, 21, 37]);
        assert!(
            a.tensor.equal(&b.tensor),
            "raw pixels differ from the decoded PNG"
        );
    }

    /// Raw pixels of another length than their size, an empty size, or over the pixel limit
    /// are refused before a tensor is made.
    #[test]
    fn raw_rgb8_is_refused_when_its_size_does_not_hold() {
        let raw = |width, height, len: usize| ImageInput::Rgb8 {
            width,
            height,
            pixels: vec![0u8; len].into(),
        };
        let short = raw(4, 3, 35).size();
        assert!(matches!(short, Err(ImageError::Decode(m)) if m.contains("36 bytes")));
        assert!(matches!(raw(0, 3, 0).size(), Err(ImageError::Empty)));
        let large = raw(4, 3, 36).decode(11);
        assert!(matches!(
            large,
            Err(ImageError::TooLarge { pixels: 12, .. })
        ));
        assert!(raw(4, 3, 36).decode(12).is_ok());
    }
}
