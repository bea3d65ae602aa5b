//! Checkpoint loading: torchvision `.pth` files (zip and legacy pickle formats) and
//! `.safetensors`, read into a name → tensor map that model constructors walk by path.
//!
//! Model code asks for each tensor by its torchvision state_dict name with the shape it
//! expects; the loader records what is missing, mismatched or left over and reports all of it
//! at once, so a wrong file gets one error that names every problem.

pub mod hub;
mod pickle;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

/// Errors from reading or matching a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("weights file {path} does not fit the {model} model:{details}")]
    Mismatch {
        path: PathBuf,
        model: String,
        details: String,
    },
    #[error("weights file {path}: {reason}")]
    Unrecognized { path: PathBuf, reason: String },
}

/// Named tensors from the bytes of a `torch.save` file (zip or legacy format). The reader
/// takes files users download from anywhere: it refuses what it does not understand rather
/// than trusting sizes and offsets (fuzzed, see `fuzz/`).
pub fn read_torch_bytes(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    pickle::load_torch_file(bytes)
}

/// The tensors of one checkpoint, by state_dict name.
pub struct StateDict {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
}

impl StateDict {
    /// Reads `.safetensors` by extension; anything else as a `torch.save` file.
    pub fn load(path: &Path) -> Result<Self, WeightsError> {
        let read_err = |reason: String| WeightsError::Read {
            path: path.to_owned(),
            reason,
        };
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let list = if is_safetensors {
            Tensor::read_safetensors(path).map_err(|e| read_err(e.to_string()))?
        } else {
            let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
            read_torch_bytes(&bytes).map_err(read_err)?
        };
        let tensors = list
            .into_iter()
            .map(|(k, v)| (strip_prefix(k), v))
            .collect();
        Ok(Self {
            path: path.to_owned(),
            tensors,
        })
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, key: &str) -> Option<Vec<i64>> {
        self.tensors.get(key).map(Tensor::size)
    }

    /// Renames keys with `from` as prefix to start with `to` instead.
    pub fn rename_prefix(&mut self, from: &str, to: &str) {
        let keys: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(from))
            .cloned()
            .collect();
        for k in keys {
            if let Some(t) = self.tensors.remove(&k) {
                self.tensors.insert(format!("{to}{}", &k[from.len()..]), t);
            }
        }
    }
}

/// Checkpoints saved from a wrapper module (`module.` from DataParallel, `model.` from some
/// training loops) carry a prefix; torchvision's own names start at the model.
fn strip_prefix(key: String) -> String {
    key.strip_prefix("module.")
        .map(str::to_owned)
        .unwrap_or(key)
}

/// Hands out tensors by path and remembers what did not fit.
pub struct Loader {
    sd: StateDict,
    model: String,
    device: Device,
    used: RefCell<BTreeSet<String>>,
    missing: RefCell<Vec<String>>,
    mismatched: RefCell<Vec<String>>,
}

impl Loader {
    pub fn new(sd: StateDict, model: &str, device: Device) -> Self {
        Self {
            sd,
            model: model.to_owned(),
            device,
            used: RefCell::default(),
            missing: RefCell::default(),
            mismatched: RefCell::default(),
        }
    }

    pub fn root(&self) -> VarPath<'_> {
        VarPath {
            loader: self,
            prefix: String::new(),
        }
    }

    pub fn state_dict(&self) -> &StateDict {
        &self.sd
    }

    /// Ends loading: an error naming every missing, mismatched and unexpected key.
    /// `num_batches_tracked` is a training counter that eval never reads, so it may be absent
    /// or present.
    pub fn finish(self) -> Result<(), WeightsError> {
        let used = self.used.into_inner();
        let unexpected: Vec<&String> = self
            .sd
            .tensors
            .keys()
            .filter(|k| !used.contains(*k) && !k.ends_with("num_batches_tracked"))
            .collect();
        let missing = self.missing.into_inner();
        let mismatched = self.mismatched.into_inner();
        if missing.is_empty() && unexpected.is_empty() && mismatched.is_empty() {
            return Ok(());
        }
        let mut details = String::new();
        append_list(&mut details, "missing keys", &missing);
        append_list(&mut details, "unexpected keys", &unexpected);
        append_list(&mut details, "shape mismatches", &mismatched);
        Err(WeightsError::Mismatch {
            path: self.sd.path,
            model: self.model,
            details,
        })
    }

    fn take(&self, key: String, shape: &[i64]) -> Tensor {
        let placeholder = || Tensor::zeros(shape, (Kind::Float, self.device));
        let Some(t) = self.sd.tensors.get(&key) else {
            self.missing.borrow_mut().push(key);
            return placeholder();
        };
        self.used.borrow_mut().insert(key.clone());
        if t.size() != shape {
            self.mismatched.borrow_mut().push(format!(
                "{key}: file has {:?}, model expects {shape:?}",
                t.size()
            ));
            return placeholder();
        }
        t.to_kind(Kind::Float).to_device(self.device)
    }
}

fn append_list<T: Display>(out: &mut String, title: &str, items: &[T]) {
    const SHOWN: usize = 20;
    if items.is_empty() {
        return;
    }
    out.push_str(&format!("\n  {} {title}: ", items.len()));
    let names: Vec<String> = items.iter().take(SHOWN).map(|k| k.to_string()).collect();
    out.push_str(&names.join(", "));
    if items.len() > SHOWN {
        out.push_str(&format!(", … ({} more)", items.len() - SHOWN));
    }
}

/// A position in the module tree, e.g. `backbone.body.layer1.0`.
#[derive(Clone)]
pub struct VarPath<'a> {
    loader: &'a Loader,
    prefix: String,
}

impl<'a> VarPath<'a> {
    pub fn sub(&self, name: impl Display) -> VarPath<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        VarPath {
            loader: self.loader,
            prefix,
        }
    }

    /// The tensor `<path>.<name>`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Tensor {
        self.loader.take(self.key(name), shape)
    }

    pub fn has(&self, name: &str) -> bool {
        self.loader.sd.has(&self.key(name))
    }

    pub fn device(&self) -> Device {
        self.loader.device
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
}
