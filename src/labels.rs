//! Class names: the COCO (91 ids with N/A gaps) and ImageNet (1000) tables shipped in
//! `models/`, or a user's labels file for fine-tuned checkpoints.

use std::path::Path;

use crate::model::detector::Family;
use crate::model::{Detection, Prediction};
use crate::rle::MaskShape;

const COCO: &str = include_str!("../models/coco_categories.txt");
const IMAGENET: &str = include_str!("../models/imagenet_categories.txt");

#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error("cannot read labels file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("labels file {file} names {found} classes, the model has {expected}")]
    Count {
        file: String,
        found: usize,
        expected: i64,
    },
    #[error("labels file {file}, line {line}: {reason}")]
    Line {
        file: String,
        line: usize,
        reason: String,
    },
}

/// Names by class id.
#[derive(Clone, Debug)]
pub struct Labels(Vec<String>);

/// A detection with its class name: what the service answers, the CLI writes and the renderer
/// draws. Each edge shapes it its own way (JSON, protobuf).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedDetection {
    /// [x1, y1, x2, y2] in original-image pixels.
    pub bbox: [f32; 4],
    pub score: f32,
    pub label_id: i64,
    pub label: String,
    /// A Mask R-CNN's mask, in the form the request asked for.
    pub mask: Option<MaskShape>,
    /// A Keypoint R-CNN's keypoints, in the model's order.
    pub keypoints: Option<Vec<NamedKeypoint>>,
}

/// A keypoint with its name, in original-image pixels; `score` is its heatmap logit.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedKeypoint {
    pub name: String,
    pub x: f32,
    pub y: f32,
    pub score: f32,
}

/// COCO's person keypoints, in the order torchvision's Keypoint R-CNN predicts them.
pub const COCO_KEYPOINTS: [&str; 17] = [
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
];

/// COCO's person skeleton as pairs of indices into [`COCO_KEYPOINTS`] (COCO's annotation
/// files list the same edges counting from 1).
pub const COCO_SKELETON: [[usize; 2]; 19] = [
    [15, 13],
    [13, 11],
    [16, 14],
    [14, 12],
    [11, 12],
    [5, 11],
    [6, 12],
    [5, 6],
    [5, 7],
    [6, 8],
    [7, 9],
    [8, 10],
    [1, 2],
    [0, 1],
    [0, 2],
    [1, 3],
    [2, 4],
    [3, 5],
    [4, 6],
];

/// The names of a Keypoint R-CNN's keypoints and the edges between them: COCO's for 17.
#[derive(Clone, Debug, PartialEq)]
pub struct KeypointSchema {
    pub names: Vec<String>,
    pub skeleton: Vec<[usize; 2]>,
}

impl KeypointSchema {
    pub fn for_count(n: i64) -> Self {
        if n == COCO_KEYPOINTS.len() as i64 {
            Self {
                names: COCO_KEYPOINTS.iter().map(|s| s.to_string()).collect(),
                skeleton: COCO_SKELETON.to_vec(),
            }
        } else {
            Self {
                names: (0..n).map(|i| format!("keypoint_{i}")).collect(),
                skeleton: Vec::new(),
            }
        }
    }
}

/// A class prediction with its name.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedPrediction {
    pub label_id: i64,
    pub label: String,
    pub score: f32,
}

/// One non-empty line of a labels file: `id<TAB>name`, or a name alone.
enum Line<'a> {
    Id(u32, &'a str),
    Name(&'a str),
}

fn parse_line(line: &str) -> Line<'_> {
    match line.split_once('\t') {
        Some((id, name)) => match id.trim().parse::<u32>() {
            Ok(id) => Line::Id(id, name.trim()),
            Err(_) => Line::Name(line.trim()),
        },
        None => Line::Name(line.trim()),
    }
}

impl Labels {
    /// Parses a labels file for a model with `num_classes` outputs. A file of `id<TAB>name`
    /// lines is mapped by id (ids past the model's classes, repeated ids or lines without an
    /// id among them are errors, so a file never shifts names silently; ids it leaves out are
    /// named `class_<id>`); a file of names alone must name every class, in order.
    pub fn from_text(text: &str, num_classes: i64, file: &str) -> Result<Self, LabelsError> {
        let lines: Vec<(usize, Line)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, parse_line(l)))
            .collect();
        let has_ids = lines.iter().any(|(_, l)| matches!(l, Line::Id(..)));
        if !has_ids {
            let names: Vec<String> = lines
                .into_iter()
                .map(|(_, l)| match l {
                    Line::Name(n) | Line::Id(_, n) => n.to_owned(),
                })
                .collect();
            return Self::counted(names, num_classes, file);
        }
        let line_error = |line: usize, reason: String| LabelsError::Line {
            file: file.to_owned(),
            line,
            reason,
        };
        let mut names: Vec<Option<String>> = vec![None; num_classes.max(0) as usize];
        for (n, line) in lines {
            let (id, name) = match line {
                Line::Id(id, name) => (id, name),
                Line::Name(_) => {
                    return Err(line_error(
                        n,
                        "no `id<TAB>` where other lines have one".into(),
                    ))
                }
            };
            let slot = names.get_mut(id as usize).ok_or_else(|| {
                line_error(
                    n,
                    format!("id {id} is past the model's {num_classes} classes"),
                )
            })?;
            if slot.is_some() {
                return Err(line_error(n, format!("id {id} is named twice")));
            }
            *slot = Some(name.to_owned());
        }
        let names = names
            .into_iter()
            .enumerate()
            .map(|(i, n)| n.unwrap_or_else(|| format!("class_{i}")))
            .collect();
        Ok(Labels(names))
    }

    fn counted(names: Vec<String>, num_classes: i64, file: &str) -> Result<Self, LabelsError> {
        if names.len() as i64 != num_classes {
            return Err(LabelsError::Count {
                file: file.to_owned(),
                found: names.len(),
                expected: num_classes,
            });
        }
        Ok(Labels(names))
    }

    /// A table shipped with detectd, whose ids are its line numbers.
    fn table(text: &str) -> Self {
        Labels(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| match parse_line(l) {
                    Line::Id(_, n) | Line::Name(n) => n.to_owned(),
                })
                .collect(),
        )
    }

    pub fn coco() -> Self {
        Self::table(COCO)
    }

    pub fn imagenet() -> Self {
        Self::table(IMAGENET)
    }

    /// A detector's class names: the file if given, else torchvision's table for its family
    /// (COCO's, or COCO person for Keypoint R-CNN) when the class count fits.
    pub fn for_detector(
        file: Option<&Path>,
        family: Family,
        num_classes: i64,
    ) -> Result<Self, LabelsError> {
        let default = match family {
            Family::KeypointRcnn => Labels::coco_person,
            Family::FasterRcnn | Family::MaskRcnn => Labels::coco,
        };
        Self::for_model(file, num_classes, default)
    }

    /// torchvision's Keypoint R-CNN classes (`_COCO_PERSON_CATEGORIES`).
    pub fn coco_person() -> Self {
        Labels(vec!["no person".into(), "person".into()])
    }

    /// The labels for a model with `num_classes` outputs: the file if given, else the table
    /// that fits (COCO for 91 detector classes, ImageNet for 1000), else `class_<id>`.
    pub fn for_model(
        file: Option<&Path>,
        num_classes: i64,
        default: fn() -> Labels,
    ) -> Result<Self, LabelsError> {
        match file {
            Some(path) => {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|e| LabelsError::Read(name.clone(), e))?;
                Self::from_text(&text, num_classes, &name)
            }
            None => {
                let d = default();
                if d.len() as i64 == num_classes {
                    Ok(d)
                } else {
                    Ok(Labels(
                        (0..num_classes).map(|i| format!("class_{i}")).collect(),
                    ))
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn name(&self, id: i64) -> &str {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.0.get(i))
            .map(String::as_str)
            .unwrap_or("unknown")
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }

    pub fn detection(&self, d: &Detection) -> NamedDetection {
        NamedDetection {
            bbox: d.bbox,
            score: d.score,
            label_id: d.label,
            label: self.name(d.label).to_owned(),
            mask: None,
            keypoints: None,
        }
    }

    pub fn predictions(&self, preds: &[Prediction]) -> Vec<NamedPrediction> {
        preds
            .iter()
            .map(|p| NamedPrediction {
                label_id: p.label,
                label: self.name(p.label).to_owned(),
                score: p.score,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_their_sizes() {
        assert_eq!(Labels::coco().len(), 91);
        assert_eq!(Labels::coco().name(1), "person");
        assert_eq!(Labels::coco().name(12), "N/A");
        assert_eq!(Labels::imagenet().len(), 1000);
    }

    #[test]
    fn plain_name_lists_parse() {
        let l = Labels::from_text("background\ncat\ndog\n", 3, "f").expect("parse");
        assert_eq!(l.name(2), "dog");
        assert!(Labels::from_text("cat\ndog\n", 3, "f").is_err());
    }

    #[test]
    fn id_files_map_by_id_and_refuse_disagreement() {
        let l = Labels::from_text("3\tdog\n1\tcat\n", 5, "f").expect("parse");
        assert_eq!(l.name(1), "cat");
        assert_eq!(l.name(3), "dog");
        assert_eq!(l.name(2), "class_2");
        assert_eq!(l.len(), 5);
        let err = |t: &str| Labels::from_text(t, 5, "f").expect_err(t).to_string();
        assert!(err("5\tdog\n").contains("past the model's 5 classes"));
        assert!(err("1\tcat\n1\tdog\n").contains("named twice"));
        assert!(err("1\tcat\ndog\n").contains("line 2"));
    }
}
