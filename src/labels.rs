//! Class names: the COCO (91 ids with N/A gaps) and ImageNet (1000) tables shipped in
//! `models/`, or a user's labels file for fine-tuned checkpoints.

use std::path::Path;

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
}

/// Names by class id.
#[derive(Clone, Debug)]
pub struct Labels(Vec<String>);

impl Labels {
    /// Parses `id<TAB>name` lines, or one name per line (the line number is the id).
    pub fn parse(text: &str) -> Self {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let names = lines
            .iter()
            .map(|l| match l.split_once('\t') {
                Some((id, name)) if id.trim().parse::<u32>().is_ok() => name.trim().to_owned(),
                _ => l.trim().to_owned(),
            })
            .collect();
        Labels(names)
    }

    pub fn coco() -> Self {
        Self::parse(COCO)
    }

    pub fn imagenet() -> Self {
        Self::parse(IMAGENET)
    }

    /// The labels for a model with `num_classes` outputs: the file if given, else the table
    /// that fits (COCO for 91 detector classes, ImageNet for 1000), else `class_<id>`.
    pub fn for_model(
        file: Option<&Path>,
        num_classes: i64,
        default: fn() -> Labels,
    ) -> Result<Self, LabelsError> {
        let labels = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| LabelsError::Read(path.display().to_string(), e))?;
                Self::parse(&text)
            }
            None => {
                let d = default();
                if d.len() as i64 == num_classes {
                    d
                } else {
                    Labels((0..num_classes).map(|i| format!("class_{i}")).collect())
                }
            }
        };
        if labels.len() as i64 != num_classes {
            return Err(LabelsError::Count {
                file: file.map(|p| p.display().to_string()).unwrap_or_default(),
                found: labels.len(),
                expected: num_classes,
            });
        }
        Ok(labels)
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
        let l = Labels::parse("background\ncat\ndog\n");
        assert_eq!(l.name(2), "dog");
    }
}
