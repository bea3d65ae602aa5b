//! COCO's run-length encoding of binary masks, as `pycocotools.mask` reads it: runs over the
//! image in column-major order, starting with a run of zeros, written as COCO's compressed
//! string (`rleToString` in the COCO API's `maskApi.c`).

use serde::Serialize;

/// A binary mask of an `h × w` image as COCO runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rle {
    pub height: u32,
    pub width: u32,
    /// Alternating run lengths, zeros first (possibly 0), column-major; they sum to h·w.
    pub counts: Vec<u32>,
}

/// The form COCO tools take: `{"size": [h, w], "counts": "<compressed>"}`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CocoRle {
    pub size: [u32; 2],
    pub counts: String,
}

/// A mask as a request asked for it.
#[derive(Clone, Debug, PartialEq)]
pub enum MaskShape {
    /// COCO's compressed RLE (what pycocotools reads).
    Rle(CocoRle),
    /// Outer contours, each `[x, y, x, y, ...]` in pixels (for clients that draw).
    Polygons(Vec<Vec<f32>>),
}

/// A block of a mask at `(x0, y0)`, `w × h`, row-major bytes 0 or 1.
pub struct Block {
    pub x0: u32,
    pub y0: u32,
    pub w: u32,
    pub h: u32,
    pub bits: Vec<u8>,
}

struct Runs {
    counts: Vec<u32>,
    value: bool,
    run: u32,
}

impl Runs {
    fn push(&mut self, value: bool, len: u32) {
        if len == 0 {
            return;
        }
        if value != self.value {
            self.counts.push(self.run);
            self.value = value;
            self.run = 0;
        }
        self.run += len;
    }
}

impl Rle {
    /// The mask of an `(height, width)` image that is 0 except for the row-major `bits` of a
    /// `crop_w`-wide block at `(x0, y0)`. Only the block is read: a full-size mask is never made.
    pub fn from_block(
        (height, width): (u32, u32),
        (x0, y0): (u32, u32),
        crop_w: u32,
        bits: &[u8],
    ) -> Self {
        let crop_h = (bits.len() as u32).checked_div(crop_w).unwrap_or(0);
        let mut runs = Runs {
            counts: Vec::new(),
            value: false,
            run: 0,
        };
        for x in 0..width {
            if x < x0 || x >= x0 + crop_w {
                runs.push(false, height);
                continue;
            }
            runs.push(false, y0);
            let col = (x - x0) as usize;
            for y in 0..crop_h as usize {
                runs.push(bits[y * crop_w as usize + col] != 0, 1);
            }
            runs.push(false, height - y0 - crop_h);
        }
        runs.counts.push(runs.run);
        Self {
            height,
            width,
            counts: runs.counts,
        }
    }

    /// Pixels set.
    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&c| c as u64)
            .sum()
    }

    /// COCO's compressed string: each count (from the third on, less the count two before)
    /// in 5-bit groups, low first, a continuation bit 0x20, offset by 48 into printable ASCII.
    pub fn coco_string(&self) -> String {
        let mut s = String::with_capacity(self.counts.len() * 2);
        for (i, &c) in self.counts.iter().enumerate() {
            let mut x = c as i64;
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            loop {
                let mut c = (x & 0x1f) as u8;
                x >>= 5;
                let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                s.push((c + 48) as char);
                if !more {
                    break;
                }
            }
        }
        s
    }

    /// Reads COCO's compressed string back (`rleFrString`); None if it does not fit the size.
    pub fn from_coco(coco: &CocoRle) -> Option<Self> {
        let bytes = coco.counts.as_bytes();
        let mut counts: Vec<u32> = Vec::new();
        let mut p = 0usize;
        while p < bytes.len() {
            let (mut x, mut k) = (0i64, 0u32);
            loop {
                let c = (*bytes.get(p)? as i64) - 48;
                if k >= 12 {
                    return None;
                }
                x |= (c & 0x1f) << (5 * k);
                p += 1;
                k += 1;
                if (c & 0x20) == 0 {
                    if (c & 0x10) != 0 {
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
            }
            if counts.len() > 2 {
                x += counts[counts.len() - 2] as i64;
            }
            counts.push(u32::try_from(x).ok()?);
        }
        let [height, width] = coco.size;
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        (total == height as u64 * width as u64).then_some(Self {
            height,
            width,
            counts,
        })
    }

    pub fn to_coco(&self) -> CocoRle {
        CocoRle {
            size: [self.height, self.width],
            counts: self.coco_string(),
        }
    }

    /// The smallest block holding every set pixel; None for an empty mask. Never the whole
    /// image unless the mask spans it.
    pub fn block(&self) -> Option<Block> {
        let h = self.height as usize;
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        let mut i = 0usize;
        for (k, &c) in self.counts.iter().enumerate() {
            if k % 2 == 1 && c > 0 {
                let (first, last) = (i, i + c as usize - 1);
                let (c0, c1) = (first / h, last / h);
                x0 = x0.min(c0);
                x1 = x1.max(c1);
                // A run within one column spans its rows; across columns, every row.
                let (r0, r1) = if c0 == c1 {
                    (first % h, last % h)
                } else {
                    (0, h - 1)
                };
                y0 = y0.min(r0);
                y1 = y1.max(r1);
            }
            i += c as usize;
        }
        if x0 == usize::MAX {
            return None;
        }
        let (w, bh) = (x1 - x0 + 1, y1 - y0 + 1);
        let mut bits = vec![0u8; w * bh];
        let mut i = 0usize;
        for (k, &c) in self.counts.iter().enumerate() {
            if k % 2 == 1 {
                for j in i..i + c as usize {
                    bits[(j % h - y0) * w + (j / h - x0)] = 1;
                }
            }
            i += c as usize;
        }
        Some(Block {
            x0: x0 as u32,
            y0: y0 as u32,
            w: w as u32,
            h: bh as u32,
            bits,
        })
    }

    /// Outer contours (holes left out) as polygons `[x, y, ...]` in image pixels, those of
    /// at least three points (what COCO and a canvas can draw). imageproc traces them.
    pub fn polygons(&self) -> Vec<Vec<f32>> {
        let Some(Block { x0, y0, w, h, bits }) = self.block() else {
            return Vec::new();
        };
        // One pixel of zeros around the block, so contours close inside it.
        let mut img = image::GrayImage::new(w + 2, h + 2);
        for y in 0..h {
            for x in 0..w {
                if bits[(y * w + x) as usize] != 0 {
                    img.put_pixel(x + 1, y + 1, image::Luma([255]));
                }
            }
        }
        imageproc::contours::find_contours::<i32>(&img)
            .into_iter()
            .filter(|c| c.border_type == imageproc::contours::BorderType::Outer)
            .filter(|c| c.points.len() >= 3)
            .map(|c| {
                c.points
                    .iter()
                    .flat_map(|p| [(p.x - 1) as f32 + x0 as f32, (p.y - 1) as f32 + y0 as f32])
                    .collect()
            })
            .collect()
    }

    /// The mask as row-major bytes, 0 or 1 (tests and drawing).
    pub fn decode(&self) -> Vec<u8> {
        let (h, w) = (self.height as usize, self.width as usize);
        let mut out = vec![0u8; h * w];
        let mut i = 0usize;
        for (k, &c) in self.counts.iter().enumerate() {
            if k % 2 == 1 {
                for j in i..i + c as usize {
                    out[(j % h) * w + j / h] = 1;
                }
            }
            i += c as usize;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_column_major_and_start_with_zeros() {
        // 3×4 image, block 2×2 at (1, 1) = [[1, 0], [1, 1]].
        let r = Rle::from_block((3, 4), (1, 1), 2, &[1, 0, 1, 1]);
        // Columns: x0 = 000, x1 = 011, x2 = 001, x3 = 000.
        assert_eq!(r.counts, vec![4, 2, 2, 1, 3]);
        assert_eq!(r.area(), 3);
        let d = r.decode();
        assert_eq!(d, vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0]);
    }

    #[test]
    fn the_block_and_polygons_cover_the_set_pixels() {
        let r = Rle::from_block((3, 4), (1, 1), 2, &[1, 0, 1, 1]);
        let b = r.block().expect("not empty");
        assert_eq!(
            ((b.x0, b.y0, b.w, b.h), b.bits),
            ((1, 1, 2, 2), vec![1, 0, 1, 1])
        );
        let square = Rle::from_block((6, 6), (1, 2), 3, &[1; 9]);
        let polys = square.polygons();
        assert_eq!(polys.len(), 1);
        let xs: Vec<f32> = polys[0].iter().step_by(2).copied().collect();
        let ys: Vec<f32> = polys[0].iter().skip(1).step_by(2).copied().collect();
        let min = |v: &[f32]| v.iter().cloned().fold(f32::MAX, f32::min);
        let max = |v: &[f32]| v.iter().cloned().fold(f32::MIN, f32::max);
        assert_eq!(
            (min(&xs), max(&xs), min(&ys), max(&ys)),
            (1.0, 3.0, 2.0, 4.0)
        );
        assert!(Rle::from_block((2, 2), (0, 0), 0, &[])
            .polygons()
            .is_empty());
    }

    #[test]
    fn a_mask_starting_with_ones_has_a_zero_first_run() {
        let r = Rle::from_block((2, 1), (0, 0), 1, &[1, 1]);
        assert_eq!(r.counts, vec![0, 2]);
        let r = Rle::from_block((2, 2), (0, 0), 0, &[]);
        assert_eq!(r.counts, vec![4]);
    }

    #[test]
    fn the_string_is_cocos() {
        // The real check is tests/it/instance_serving.rs against pycocotools; here the coding by hand.
        let r = Rle {
            height: 10,
            width: 10,
            counts: vec![5, 40, 10, 45],
        };
        // 5 → '5'; 40 → 8 | 0x20, then 1 → "X1"; 10 (the third, not yet a delta) → ':';
        // 45 - 40 → '5'.
        assert_eq!(r.coco_string(), "5X1:5");
        assert_eq!(Rle::from_coco(&r.to_coco()), Some(r));
    }
}
