//! Detections drawn onto their image: a box, and the label and score on a tab above it, in a
//! colour fixed per class id, with DejaVu Sans compiled into the binary (no font file at run
//! time). Knows nothing of HTTP; the server's `?render=` and the CLI's `--render-dir` use it.

use std::io::Cursor;
use std::sync::OnceLock;

use ab_glyph::{FontRef, PxScale};
use image::{ImageFormat, Rgb, RgbImage};
use imageproc::drawing::{
    draw_filled_circle_mut, draw_filled_rect_mut, draw_hollow_rect_mut, draw_line_segment_mut,
    draw_text_mut, text_size,
};
use imageproc::rect::Rect;

use crate::imaging::{self, ImageError};
use crate::labels::{NamedDetection, NamedKeypoint, COCO_SKELETON};
use crate::rle::{MaskShape, Rle};

/// The encodings a rendered image can be answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Some(Format::Png),
            "jpeg" | "jpg" => Some(Format::Jpeg),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Png => "image/png",
            Format::Jpeg => "image/jpeg",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Decode(#[from] ImageError),
    #[error("cannot encode the rendered image: {0}")]
    Encode(#[from] image::ImageError),
}

/// Tableau's 10 colours (as matplotlib's tab10): distinct, readable with white or black text.
const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// The colour of a class: the same id gets the same colour in every image and run.
pub fn colour(label_id: i64) -> Rgb<u8> {
    Rgb(PALETTE[label_id.rem_euclid(PALETTE.len() as i64) as usize])
}

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| {
        FontRef::try_from_slice(dejavu::sans::regular()).expect("the embedded DejaVu Sans parses")
    })
}

/// Decodes `bytes`, draws `detections` on it and encodes it as `format`, at the input's size.
pub fn annotate(
    bytes: &[u8],
    max_pixels: u64,
    detections: &[NamedDetection],
    format: Format,
) -> Result<Vec<u8>, RenderError> {
    let mut img = imaging::decode_pixels(bytes, max_pixels)?;
    draw(&mut img, detections);
    encode(&img, format)
}

pub fn encode(img: &RgbImage, format: Format) -> Result<Vec<u8>, RenderError> {
    let mut out = Cursor::new(Vec::new());
    let format = match format {
        Format::Png => ImageFormat::Png,
        Format::Jpeg => ImageFormat::Jpeg,
    };
    img.write_to(&mut out, format)?;
    Ok(out.into_inner())
}

/// Draws lowest score first, so the most confident boxes and tabs end up on top: masks
/// translucent in the class colour, then boxes and tabs, then keypoints and their skeleton.
pub fn draw(img: &mut RgbImage, detections: &[NamedDetection]) {
    let short = img.width().min(img.height()) as f32;
    // Lines and text grow with the image so they stay visible on large photos.
    let thickness = (short / 300.0).round().clamp(1.0, 8.0) as i32;
    let scale = PxScale::from((short / 40.0).clamp(11.0, 40.0));
    for d in detections.iter().rev() {
        if let Some(mask) = &d.mask {
            draw_mask(img, mask, colour(d.label_id));
        }
        draw_one(img, d, thickness, scale);
        if let Some(kps) = &d.keypoints {
            draw_keypoints(img, kps, colour(d.label_id), thickness);
        }
    }
}

/// Half the class colour over the mask's pixels.
fn draw_mask(img: &mut RgbImage, mask: &MaskShape, c: Rgb<u8>) {
    let blend = |p: &mut Rgb<u8>| {
        for (v, c) in p.0.iter_mut().zip(c.0) {
            *v = ((*v as u16 + c as u16) / 2) as u8;
        }
    };
    match mask {
        MaskShape::Rle(coco) => {
            let Some(b) = Rle::from_coco(coco).and_then(|r| r.block()) else {
                return;
            };
            for y in 0..b.h {
                for x in 0..b.w {
                    let (px, py) = (b.x0 + x, b.y0 + y);
                    if b.bits[(y * b.w + x) as usize] != 0 && px < img.width() && py < img.height()
                    {
                        blend(img.get_pixel_mut(px, py));
                    }
                }
            }
        }
        MaskShape::Polygons(polys) => {
            // Outlines only: a filled polygon would hide the image under it.
            for p in polys {
                let pts: Vec<(f32, f32)> = p.chunks_exact(2).map(|q| (q[0], q[1])).collect();
                for (a, b) in pts.iter().zip(pts.iter().cycle().skip(1)) {
                    draw_line_segment_mut(img, *a, *b, c);
                }
            }
        }
    }
}

/// Keypoints as dots, and COCO's skeleton between them for 17-keypoint models.
fn draw_keypoints(img: &mut RgbImage, kps: &[NamedKeypoint], c: Rgb<u8>, thickness: i32) {
    if kps.len() == 17 {
        for [a, b] in COCO_SKELETON {
            draw_line_segment_mut(img, (kps[a].x, kps[a].y), (kps[b].x, kps[b].y), c);
        }
    }
    for k in kps {
        let at = (k.x.round() as i32, k.y.round() as i32);
        draw_filled_circle_mut(img, at, thickness + 2, text_colour(c));
        draw_filled_circle_mut(img, at, thickness + 1, c);
    }
}

fn draw_one(img: &mut RgbImage, d: &NamedDetection, thickness: i32, scale: PxScale) {
    let c = colour(d.label_id);
    let [x1, y1, x2, y2] = d.bbox.map(|v| v.round() as i32);
    for t in 0..thickness {
        let (w, h) = ((x2 - x1 - 2 * t).max(1), (y2 - y1 - 2 * t).max(1));
        draw_hollow_rect_mut(img, Rect::at(x1 + t, y1 + t).of_size(w as u32, h as u32), c);
    }
    let text = format!("{} {:.2}", d.label, d.score);
    let (tw, th) = text_size(scale, font(), &text);
    let (tw, th) = (tw as i32 + 4, th as i32 + 4);
    // The tab sits above the box, or inside it where the box touches the top edge.
    let ty = if y1 >= th { y1 - th } else { y1 };
    draw_filled_rect_mut(img, Rect::at(x1, ty).of_size(tw as u32, th as u32), c);
    draw_text_mut(img, text_colour(c), x1 + 2, ty + 1, scale, font(), &text);
}

/// Black on light colours, white on dark ones (ITU-R BT.601 luma).
fn text_colour(c: Rgb<u8>) -> Rgb<u8> {
    let [r, g, b] = c.0.map(f32::from);
    if 0.299 * r + 0.587 * g + 0.114 * b > 150.0 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(bbox: [f32; 4], label_id: i64) -> NamedDetection {
        NamedDetection {
            bbox,
            score: 0.5,
            label_id,
            label: "thing".into(),
            mask: None,
            keypoints: None,
        }
    }

    #[test]
    fn colours_are_stable_per_class() {
        assert_eq!(colour(3), colour(3));
        assert_ne!(colour(1), colour(2));
        assert_eq!(colour(-1), colour(9));
    }

    #[test]
    fn a_box_is_drawn_where_it_is_and_nowhere_far_from_it() {
        let mut img = RgbImage::from_pixel(200, 100, Rgb([0, 0, 0]));
        draw(&mut img, &[det([50.0, 40.0, 120.0, 90.0], 1)]);
        assert_eq!(*img.get_pixel(50, 60), colour(1));
        assert_eq!(*img.get_pixel(119, 60), colour(1));
        assert_eq!(*img.get_pixel(190, 5), Rgb([0, 0, 0]));
        assert_eq!(img.dimensions(), (200, 100));
    }

    #[test]
    fn boxes_past_the_edges_are_clipped() {
        let mut img = RgbImage::new(20, 20);
        draw(&mut img, &[det([-5.0, -5.0, 40.0, 40.0], 0)]);
        assert_eq!(img.dimensions(), (20, 20));
    }

    #[test]
    fn formats_parse_and_encode() {
        assert_eq!(Format::parse("PNG"), Some(Format::Png));
        assert_eq!(Format::parse("jpg"), Some(Format::Jpeg));
        assert_eq!(Format::parse("gif"), None);
        let img = RgbImage::new(8, 4);
        for f in [Format::Png, Format::Jpeg] {
            let bytes = encode(&img, f).unwrap();
            let back = image::load_from_memory(&bytes).unwrap();
            assert_eq!((back.width(), back.height()), (8, 4));
        }
    }
}
