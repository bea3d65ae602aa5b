//! Where the CLI's results go: JSON lines as each batch finishes, or COCO results written at the
//! end with the image file that pycocotools needs beside them.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use serde_json::{json, Value};

use crate::api::{DetectionJson, PredictionJson};
use crate::labels::{KeypointSchema, Labels};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per image per line.
    Jsonl,
    /// COCO detection results, `[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`,
    /// plus `<output>.images.json` (needs --output).
    Coco,
}

/// An image that was read, as the results name it.
pub struct ImageInfo<'a> {
    pub path: &'a Path,
    pub width: u32,
    pub height: u32,
}

pub enum Sink {
    Jsonl(Box<dyn Write>),
    Coco {
        output: PathBuf,
        images: Vec<Value>,
        results: Vec<Value>,
    },
}

/// `out.json` → `out.images.json`: the COCO image list (ids, file names, sizes, categories).
pub fn images_file(output: &Path) -> PathBuf {
    output.with_extension("images.json")
}

impl Sink {
    pub fn open(format: Format, output: Option<&Path>) -> anyhow::Result<Sink> {
        match (format, output) {
            (Format::Jsonl, None) => Ok(Sink::Jsonl(Box::new(std::io::stdout()))),
            (Format::Jsonl, Some(path)) => {
                let file = std::fs::File::create(path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                Ok(Sink::Jsonl(Box::new(BufWriter::new(file))))
            }
            (Format::Coco, None) => anyhow::bail!(
                "--format coco needs --output FILE: the image list is written beside it as FILE.images.json"
            ),
            (Format::Coco, Some(path)) => Ok(Sink::Coco {
                output: path.to_owned(),
                images: Vec::new(),
                results: Vec::new(),
            }),
        }
    }

    fn line(&mut self, image: &ImageInfo, key: &str, value: Value) -> anyhow::Result<()> {
        let Sink::Jsonl(out) = self else {
            anyhow::bail!("COCO results hold detections only");
        };
        let line = json!({
            "image": image.path.display().to_string(),
            "width": image.width,
            "height": image.height,
            key: value,
        });
        writeln!(out, "{line}")?;
        Ok(())
    }

    pub fn predictions(
        &mut self,
        image: &ImageInfo,
        preds: &[PredictionJson],
    ) -> anyhow::Result<()> {
        self.line(image, "predictions", serde_json::to_value(preds)?)
    }

    pub fn detections(&mut self, image: &ImageInfo, dets: &[DetectionJson]) -> anyhow::Result<()> {
        let (images, results) = match self {
            Sink::Jsonl(_) => return self.line(image, "detections", serde_json::to_value(dets)?),
            Sink::Coco {
                images, results, ..
            } => (images, results),
        };
        // COCO image ids start at 1; torchvision's COCO label ids are COCO category ids.
        let id = images.len() + 1;
        images.push(json!({
            "id": id,
            "file_name": image.path.display().to_string(),
            "width": image.width,
            "height": image.height,
        }));
        results.extend(dets.iter().map(|d| {
            let [x1, y1, x2, y2] = d.bbox;
            let mut r = json!({"image_id": id, "category_id": d.label_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": d.score});
            // COCO's segmentation results: the RLE (or polygons) as the answer carries them.
            if let Some(mask) = &d.mask {
                r["segmentation"] = serde_json::to_value(mask)?;
            }
            // COCO's keypoint results: x, y, v per keypoint (v = 1, as torchvision writes).
            if let Some(kps) = &d.keypoints {
                let flat: Vec<f32> = kps.iter().flat_map(|k| [k.x, k.y, 1.0]).collect();
                r["keypoints"] = json!(flat);
            }
            Ok(r)
        }).collect::<anyhow::Result<Vec<Value>>>()?);
        Ok(())
    }

    /// Flushes JSON lines, or writes the COCO files; `labels` names the categories.
    /// Keypoint models' categories carry COCO's `keypoints` and 1-based `skeleton`, which
    /// `COCOeval(iouType="keypoints")` reads.
    pub fn finish(self, labels: &Labels, keypoints: Option<&KeypointSchema>) -> anyhow::Result<()> {
        match self {
            Sink::Jsonl(mut out) => Ok(out.flush()?),
            Sink::Coco {
                output,
                images,
                results,
            } => {
                let categories: Vec<Value> = (1..labels.len() as i64)
                    .filter(|&i| !matches!(labels.name(i), "N/A" | "__background__"))
                    .map(|i| {
                        let mut c = json!({"id": i, "name": labels.name(i)});
                        if let Some(k) = keypoints {
                            c["keypoints"] = json!(k.names);
                            let edges: Vec<[usize; 2]> =
                                k.skeleton.iter().map(|[a, b]| [a + 1, b + 1]).collect();
                            c["skeleton"] = json!(edges);
                        }
                        c
                    })
                    .collect();
                let listing = json!({"images": images, "categories": categories});
                write_json(&output, &Value::Array(results))?;
                write_json(&images_file(&output), &listing)
            }
        }
    }
}

fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = BufWriter::new(file);
    serde_json::to_writer(&mut out, value)?;
    Ok(out.flush()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_images_file_sits_beside_the_output() {
        assert_eq!(
            images_file(Path::new("r/out.json")),
            PathBuf::from("r/out.images.json")
        );
        assert_eq!(
            images_file(Path::new("out")),
            PathBuf::from("out.images.json")
        );
    }

    #[test]
    fn coco_needs_an_output_file() {
        assert!(Sink::open(Format::Coco, None).is_err());
    }
}
