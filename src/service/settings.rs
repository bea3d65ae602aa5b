//! One model's configuration, as `--model NAME=SOURCE,key=value`, a `[[model]]` table of
//! `--config`, or an admin PUT's JSON body give it: every reader goes through `set`, so the
//! three accept and refuse exactly the same keys and values.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::batch::BatchConfig;
use crate::model::detector::DetectorParams;
use crate::model::{ArchChoice, DeviceChoice, Named, Precision, Preset, Task};

/// Every key a model takes, in the order `/v1/models` lists them.
pub const KEYS: [&str; 22] = [
    "source",
    "sha256",
    "task",
    "default",
    "arch",
    "preset",
    "labels",
    "frozen_bn_eps",
    "device",
    "precision",
    "max_batch_size",
    "max_batch_delay_ms",
    "max_queue",
    "weight",
    "min_size",
    "max_size",
    "box_score_thresh",
    "box_nms_thresh",
    "box_detections_per_img",
    "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test",
    "rpn_nms_thresh",
];

/// Largest `min_size`/`max_size`: a 4096² input already holds ~200 MB of f32 per feature map.
const MAX_SIDE: i64 = 4096;

/// A model's settings; what a key does not set comes from the server's flags.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    pub name: String,
    /// A file, a published name, or an http(s) URL (with `sha256`).
    pub source: String,
    pub sha256: Option<String>,
    /// None: read from the checkpoint's keys.
    pub task: Option<Task>,
    /// Answers `/detect` (or `/classify`) without `?model=`.
    pub default: bool,
    pub arch: ArchChoice,
    pub preset: Preset,
    pub labels: Option<PathBuf>,
    pub frozen_bn_eps: Option<f64>,
    pub device: DeviceChoice,
    pub precision: Precision,
    pub batch: BatchConfig,
    /// Its share of the CPU against the other models when all are busy (weight over the sum).
    pub weight: f64,
    pub detector: DetectorParams,
}

/// What a model takes when its settings do not say: the server's flags (`Default`: their
/// defaults).
#[derive(Debug, Clone)]
pub struct SettingsDefaults {
    pub arch: ArchChoice,
    pub preset: Preset,
    pub frozen_bn_eps: Option<f64>,
    pub device: DeviceChoice,
    pub precision: Precision,
    pub batch: BatchConfig,
}

impl Default for SettingsDefaults {
    fn default() -> Self {
        Self {
            arch: ArchChoice::Auto,
            preset: Preset::V2,
            frozen_bn_eps: None,
            device: DeviceChoice::Auto,
            precision: Precision::Auto,
            batch: BatchConfig {
                max_batch_size: 4,
                max_batch_delay: Duration::from_millis(5),
                max_queue: 64,
            },
        }
    }
}

/// Why a model's settings were refused, naming the model and the key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("model {model:?}: {key}: {reason}")]
pub struct SettingsError {
    pub model: String,
    pub key: String,
    pub reason: String,
}

/// A name routes and metric labels can carry as they are.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a model name (1 to 64 of A-Z a-z 0-9 - _ .)"
        ))
    }
}

fn parse<T: std::str::FromStr>(value: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value.trim().parse().map_err(|e| format!("{value:?}: {e}"))
}

fn in_range<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    value: &str,
    lo: T,
    hi: T,
) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let v: T = parse(value)?;
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not within {lo}..={hi}"))
    }
}

fn named<T: Named>(value: &str) -> Result<T, String> {
    T::from_name(value.trim()).ok_or_else(|| {
        let known: Vec<&str> = T::ALL.iter().map(|v| v.name()).collect();
        format!("{value:?} is none of {}", known.join(", "))
    })
}

fn unit(value: &str) -> Result<f64, String> {
    in_range(value, 0.0, 1.0)
}

impl ModelSettings {
    pub fn new(name: &str, source: &str, defaults: &SettingsDefaults) -> Self {
        Self {
            name: name.into(),
            source: source.into(),
            sha256: None,
            task: None,
            default: false,
            arch: defaults.arch,
            preset: defaults.preset,
            labels: None,
            frozen_bn_eps: defaults.frozen_bn_eps,
            device: defaults.device,
            precision: defaults.precision,
            batch: defaults.batch,
            weight: 1.0,
            detector: DetectorParams::default(),
        }
    }

    /// `NAME=SOURCE[,key=value...]`, as `--model` takes it.
    pub fn from_flag(flag: &str, defaults: &SettingsDefaults) -> Result<Self, SettingsError> {
        let mut parts = flag.split(',');
        let first = parts.next().unwrap_or_default();
        let Some((name, source)) = first.split_once('=') else {
            return Err(SettingsError {
                model: first.into(),
                key: "--model".into(),
                reason: format!("{flag:?} is not NAME=SOURCE[,key=value...]"),
            });
        };
        let pairs = parts.map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), v.to_string()),
            None => (kv.trim().to_string(), String::new()),
        });
        let pairs: Vec<(String, String)> = std::iter::once(("source".into(), source.into()))
            .chain(pairs)
            .collect();
        Self::from_pairs(name.trim(), pairs, defaults)
    }

    /// A model from `key = value` pairs (a `[[model]]` table, a PUT's body, a flag's list).
    pub fn from_pairs(
        name: &str,
        pairs: impl IntoIterator<Item = (String, String)>,
        defaults: &SettingsDefaults,
    ) -> Result<Self, SettingsError> {
        let error = |key: &str, reason: String| SettingsError {
            model: name.into(),
            key: key.into(),
            reason,
        };
        check_name(name).map_err(|r| error("name", r))?;
        let mut settings = Self::new(name, "", defaults);
        for (key, value) in pairs {
            settings.set(&key, &value).map_err(|r| error(&key, r))?;
        }
        if settings.source.is_empty() {
            return Err(error(
                "source",
                "missing: a file, published name or URL".into(),
            ));
        }
        Ok(settings)
    }

    /// Sets one key from its text.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let p = &mut self.detector;
        match key {
            "source" => self.source = value.trim().into(),
            "sha256" => {
                self.sha256 = Some(
                    crate::weights::hub::parse_sha256(value.trim()).map_err(|e| e.to_string())?,
                )
            }
            "task" => self.task = Some(named(value)?),
            "default" => self.default = parse(value)?,
            "arch" => self.arch = named(value)?,
            "preset" => self.preset = named(value)?,
            "labels" => self.labels = Some(PathBuf::from(value.trim())),
            "frozen_bn_eps" => self.frozen_bn_eps = Some(in_range(value, 0.0, 1.0)?),
            "device" => self.device = named(value)?,
            "precision" => self.precision = named(value)?,
            "max_batch_size" => self.batch.max_batch_size = in_range(value, 1, 1024)?,
            "max_batch_delay_ms" => {
                self.batch.max_batch_delay = Duration::from_millis(in_range(value, 0, 60_000)?)
            }
            "max_queue" => self.batch.max_queue = in_range(value, 1, 1 << 20)?,
            "weight" => self.weight = in_range(value, 0.01, 100.0)?,
            "min_size" => p.min_size = in_range(value, 1, MAX_SIDE)?,
            "max_size" => p.max_size = in_range(value, 1, MAX_SIDE)?,
            "box_score_thresh" => p.box_score_thresh = unit(value)?,
            "box_nms_thresh" => p.box_nms_thresh = unit(value)?,
            "box_detections_per_img" => p.box_detections_per_img = in_range(value, 1, 10_000)?,
            "rpn_pre_nms_top_n_test" => p.rpn_pre_nms_top_n_test = in_range(value, 1, 100_000)?,
            "rpn_post_nms_top_n_test" => p.rpn_post_nms_top_n_test = in_range(value, 1, 100_000)?,
            "rpn_nms_thresh" => p.rpn_nms_thresh = unit(value)?,
            _ => return Err(format!("unknown key (known: {})", KEYS.join(", "))),
        }
        Ok(())
    }

    /// Every key with its value, as `/v1/models` shows them (the source as given).
    pub fn entries(&self) -> Vec<(&'static str, serde_json::Value)> {
        use serde_json::json;
        let p = &self.detector;
        let b = &self.batch;
        let all = [
            json!(self.source),
            json!(self.sha256),
            json!(self.task.map(|t| t.name())),
            json!(self.default),
            json!(self.arch.name()),
            json!(self.preset.name()),
            json!(self.labels),
            json!(self.frozen_bn_eps),
            json!(self.device.name()),
            json!(self.precision.name()),
            json!(b.max_batch_size),
            json!(b.max_batch_delay.as_millis() as u64),
            json!(b.max_queue),
            json!(self.weight),
            json!(p.min_size),
            json!(p.max_size),
            json!(p.box_score_thresh),
            json!(p.box_nms_thresh),
            json!(p.box_detections_per_img),
            json!(p.rpn_pre_nms_top_n_test),
            json!(p.rpn_post_nms_top_n_test),
            json!(p.rpn_nms_thresh),
        ];
        KEYS.into_iter().zip(all).collect()
    }
}

/// A JSON or TOML scalar as the text `set` reads.
pub fn scalar_text(value: &serde_json::Value) -> Result<String, String> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("{other} is not a string, number or boolean")),
    }
}

/// A `--config` file: `[[model]]` tables, each with its `name` and the keys of `set`.
pub fn from_config(text: &str, defaults: &SettingsDefaults) -> Result<Vec<ModelSettings>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut out = Vec::new();
    for (key, value) in table {
        let toml::Value::Array(models) = value.clone() else {
            return Err(format!(
                "{key}: not [[model]] tables (the file holds [[model]] tables only)"
            ));
        };
        if key != "model" {
            return Err(format!(
                "unknown table [[{key}]] (the file holds [[model]] tables)"
            ));
        }
        for (i, model) in models.into_iter().enumerate() {
            out.push(model_table(i, model, defaults)?);
        }
    }
    Ok(out)
}

fn model_table(
    index: usize,
    model: toml::Value,
    defaults: &SettingsDefaults,
) -> Result<ModelSettings, String> {
    let toml::Value::Table(mut table) = model else {
        return Err(format!("[[model]] number {}: not a table", index + 1));
    };
    let Some(toml::Value::String(name)) = table.remove("name") else {
        return Err(format!("[[model]] number {}: no name = \"...\"", index + 1));
    };
    let mut pairs = Vec::with_capacity(table.len());
    for (key, value) in table {
        let json = serde_json::to_value(&value).map_err(|e| e.to_string())?;
        let text = scalar_text(&json).map_err(|e| format!("model {name:?}: {key}: {e}"))?;
        pairs.push((key, text));
    }
    ModelSettings::from_pairs(&name, pairs, defaults).map_err(|e| e.to_string())
}

/// The settings as a JSON object, for `/v1/models`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(value_type = Object)]
pub struct SettingsJson(pub serde_json::Map<String, serde_json::Value>);

impl From<&ModelSettings> for SettingsJson {
    fn from(s: &ModelSettings) -> Self {
        Self(
            s.entries()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> SettingsDefaults {
        SettingsDefaults {
            arch: ArchChoice::Auto,
            preset: Preset::V2,
            frozen_bn_eps: None,
            device: DeviceChoice::Cpu,
            precision: Precision::Fp32,
            batch: BatchConfig {
                max_batch_size: 4,
                max_batch_delay: Duration::from_millis(5),
                max_queue: 64,
            },
        }
    }

    #[test]
    fn a_flag_sets_keys_and_keeps_the_rest_from_the_server() {
        let s = ModelSettings::from_flag(
            "parts=/m/p.pth,min_size=600,box_nms_thresh=0.4,labels=/m/p.txt",
            &defaults(),
        )
        .expect("valid");
        assert_eq!(s.name, "parts");
        assert_eq!(s.source, "/m/p.pth");
        assert_eq!(s.detector.min_size, 600);
        assert_eq!(s.detector.box_nms_thresh, 0.4);
        assert_eq!(s.detector.max_size, 1333);
        assert_eq!(s.batch.max_queue, 64);
        assert_eq!(s.labels, Some(PathBuf::from("/m/p.txt")));
    }

    #[test]
    fn errors_name_the_model_and_the_key() {
        let e = ModelSettings::from_flag("parts=/m/p.pth,box_thresh=0.3", &defaults())
            .expect_err("unknown key");
        assert_eq!((e.model.as_str(), e.key.as_str()), ("parts", "box_thresh"));
        let e = ModelSettings::from_flag("parts=/m/p.pth,box_nms_thresh=2", &defaults())
            .expect_err("out of range");
        assert_eq!(e.key, "box_nms_thresh");
        assert!(e.to_string().contains("parts"), "{e}");
        let e = ModelSettings::from_flag("bad name=/m/p.pth", &defaults()).expect_err("name");
        assert_eq!(e.key, "name");
        assert!(ModelSettings::from_flag("no-source", &defaults()).is_err());
        let e = ModelSettings::from_flag("m=/p,precision=fp64", &defaults()).expect_err("enum");
        assert!(e.reason.contains("fp32"), "{e}");
    }

    #[test]
    fn a_config_file_holds_model_tables() {
        let text = r#"
            [[model]]
            name = "parts"
            source = "/m/parts.pth"
            labels = "/m/parts.txt"
            box_score_thresh = 0.3
            default = true

            [[model]]
            name = "cls"
            source = "resnet50-v2"
            max_batch_size = 8
        "#;
        let all = from_config(text, &defaults()).expect("valid");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].detector.box_score_thresh, 0.3);
        assert!(all[0].default);
        assert_eq!(all[1].batch.max_batch_size, 8);
        let e = from_config(
            "[[model]]\nname = \"p\"\nsource = \"/x\"\nmin_sise = 3\n",
            &defaults(),
        )
        .expect_err("unknown key");
        assert!(e.contains("\"p\"") && e.contains("min_sise"), "{e}");
        assert!(from_config("[[modle]]\nname = \"p\"\n", &defaults()).is_err());
        assert!(from_config("[[model]]\nsource = \"/x\"\n", &defaults()).is_err());
    }

    #[test]
    fn entries_list_every_key_once() {
        let s = ModelSettings::new("m", "/p", &defaults());
        let keys: Vec<&str> = s.entries().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, KEYS);
    }
}
