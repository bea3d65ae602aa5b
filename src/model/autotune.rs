//! `--precision auto` by measurement: which setting is fastest depends on the CPU (oneDNN's
//! bf16 kernels beat f32 ten to one with AMX, lose to it without), and no cpuinfo flag says
//! so reliably. So each model is run once per candidate setting on its own architecture and
//! batch size, timed, and compared with exact fp32; the fastest that agrees well enough is
//! kept. The decision is cached per hardware, libtorch, model and batch, so a restart or a
//! replica on the same machine type skips the trial.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Device;

use super::{ModelError, Named, Precision};

/// The share of fp32's answers a setting must reproduce to be chosen (matched confident
/// detections; equal top-1 classes).
pub const MIN_AGREEMENT: f64 = 0.95;

/// Timed passes per candidate, after one untimed pass (which pays for oneDNN's kernel
/// selection and weight reorders); the best of them counts.
pub const TIMED_PASSES: usize = 2;

/// The settings `auto` chooses among on `device`, exact fp32 first (the reference).
pub fn candidates(device: Device) -> Vec<Precision> {
    candidates_where(device, super::device::cpu_has_bf16_instructions())
}

/// As `candidates`, given whether the CPU has bf16 instructions: without them bf16 is not
/// tried on the CPU (it only emulates, several times slower than fp32), which saves most of
/// the trial's time there.
pub fn candidates_where(device: Device, cpu_bf16: bool) -> Vec<Precision> {
    let mut c = vec![Precision::Fp32, Precision::Fp32Fast];
    if device.is_cuda() || cpu_bf16 {
        c.push(Precision::Bf16);
    }
    if device.is_cuda() {
        c.push(Precision::Fp16);
    }
    c
}

/// One candidate as the trial measured it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub precision: String,
    /// Best wall time of one pass over the trial inputs.
    pub seconds: f64,
    /// Agreement with fp32 on the trial inputs (1 for fp32 itself).
    pub agreement: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Measured at this start.
    Trial,
    /// Read from the cache folder.
    Cache,
}

/// What `auto` chose and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub chosen: String,
    pub min_agreement: f64,
    pub measured: Vec<Measured>,
    /// Seconds the trial took (loading and running every candidate).
    pub trial_seconds: f64,
    pub source: Source,
}

impl Decision {
    pub fn precision(&self) -> Option<Precision> {
        Precision::from_name(&self.chosen)
    }
}

/// The fastest measured setting whose agreement holds; fp32 when none does.
pub fn choose(measured: &[Measured], min_agreement: f64) -> Precision {
    measured
        .iter()
        .filter(|m| m.agreement >= min_agreement)
        .filter_map(|m| Some((Precision::from_name(&m.precision)?, m.seconds)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(Precision::Fp32, |(p, _)| p)
}

/// Runs the trial: `run(p)` loads the model in setting `p`, runs the trial inputs
/// `1 + TIMED_PASSES` times and returns the model, its best pass time and its answers;
/// `agree(fp32, other)` scores answers against fp32's. Keeps only the best model so far, so
/// at most two candidates (and fp32's answers) are in memory at once.
pub fn trial<M, O>(
    candidates: &[Precision],
    min_agreement: f64,
    mut run: impl FnMut(Precision) -> Result<(M, f64, O), ModelError>,
    agree: impl Fn(&O, &O) -> f64,
) -> Result<(M, Decision), ModelError> {
    let started = Instant::now();
    let mut reference: Option<O> = None;
    let mut measured = Vec::new();
    let mut best: Option<(M, f64)> = None;
    for &p in candidates {
        let (model, seconds, answers) = run(p)?;
        let agreement = match &reference {
            None => 1.0,
            Some(r) => agree(r, &answers),
        };
        tracing::info!(precision = p.name(), seconds, agreement, "precision trial");
        measured.push(Measured {
            precision: p.name().into(),
            seconds,
            agreement,
        });
        if reference.is_none() {
            reference = Some(answers);
        }
        let keep = agreement >= min_agreement && best.as_ref().is_none_or(|(_, s)| seconds < *s);
        if keep {
            best = Some((model, seconds));
        }
    }
    let (model, _) = best.ok_or_else(|| ModelError::Inference("no precision candidate".into()))?;
    let decision = Decision {
        chosen: choose(&measured, min_agreement).name().into(),
        min_agreement,
        measured,
        trial_seconds: started.elapsed().as_secs_f64(),
        source: Source::Trial,
    };
    Ok((model, decision))
}

/// Times `1 + TIMED_PASSES` calls of `pass` and returns the best timed one with the answers
/// of the last.
pub fn time_passes<O>(
    mut pass: impl FnMut() -> Result<O, ModelError>,
) -> Result<(f64, O), ModelError> {
    let mut answers = pass()?;
    let mut best = f64::INFINITY;
    for _ in 0..TIMED_PASSES {
        let t = Instant::now();
        answers = pass()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((best, answers))
}

/// What a decision depends on. Speed: the CPU (or GPU), libtorch, threads, architecture and
/// batch; agreement: the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrialKey {
    pub processor: String,
    pub libtorch: String,
    pub threads: i32,
    pub device: String,
    pub arch: String,
    pub batch: usize,
    /// SHA-256 of the weights file.
    pub weights: String,
}

impl TrialKey {
    pub fn new(device: Device, arch: &str, batch: usize, weights: &Path) -> std::io::Result<Self> {
        Ok(Self {
            processor: processor(device),
            libtorch: env!("DETECTD_LIBTORCH_VERSION").into(),
            threads: tch::get_num_threads(),
            device: format!("{device:?}").to_lowercase(),
            arch: arch.into(),
            batch,
            weights: file_sha256(weights)?,
        })
    }

    fn file_stem(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest[..12].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The CPU's model name (or the GPU's, for CUDA) as the kernel reports it.
fn processor(device: Device) -> String {
    if device.is_cuda() {
        return "cuda".into();
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    // "Intel(R) Xeon(R) Processor" names several generations under KVM; family and model
    // tell them apart.
    format!(
        "{} (family {}, model {})",
        field("model name"),
        field("cpu family"),
        field("model\t")
    )
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Decisions kept in `<cache>/precision/`, one JSON file per key.
pub struct DecisionCache {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    key: TrialKey,
    decision: Decision,
}

impl DecisionCache {
    pub fn new(cache_dir: &Path) -> Self {
        Self {
            dir: cache_dir.join("precision"),
        }
    }

    fn path(&self, key: &TrialKey, ext: &str) -> PathBuf {
        // A short digest of the key; the file repeats the key, and `get` compares it.
        self.dir.join(format!("{}.{ext}", key.file_stem()))
    }

    /// Holds the folder's trial lock exclusively until dropped, so that one trial runs at a
    /// time on the machine: timings taken while another model's trial (in this process or a
    /// replica's) runs would be wrong, and replicas starting together then read the first
    /// one's decision instead of measuring again. (flock locks belong to the open file, so
    /// two threads of one process exclude each other too.)
    pub fn lock(&self) -> std::io::Result<File> {
        std::fs::create_dir_all(&self.dir)?;
        let file = File::create(self.dir.join("trial.lock"))?;
        file.lock()?;
        Ok(file)
    }

    pub fn get(&self, key: &TrialKey) -> Option<Decision> {
        let text = std::fs::read(self.path(key, "json")).ok()?;
        let entry: Entry = serde_json::from_slice(&text).ok()?;
        (entry.key == *key && entry.decision.precision().is_some()).then_some(Decision {
            source: Source::Cache,
            ..entry.decision
        })
    }

    /// Writes atomically (a temporary file renamed), so a reader never sees half a file.
    pub fn put(&self, key: &TrialKey, decision: &Decision) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let entry = Entry {
            key: key.clone(),
            decision: decision.clone(),
        };
        let path = self.path(key, "json");
        let tmp = self.path(key, &format!("{}.tmp", std::process::id()));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&entry).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: Precision, seconds: f64, agreement: f64) -> Measured {
        Measured {
            precision: p.name().into(),
            seconds,
            agreement,
        }
    }

    #[test]
    fn the_fastest_setting_that_agrees_is_chosen() {
        let amx = [
            m(Precision::Fp32, 2.5, 1.0),
            m(Precision::Fp32Fast, 2.1, 1.0),
            m(Precision::Bf16, 0.8, 0.97),
        ];
        assert_eq!(choose(&amx, 0.95), Precision::Bf16);
        let no_amx = [
            m(Precision::Fp32, 2.5, 1.0),
            m(Precision::Fp32Fast, 2.1, 1.0),
            m(Precision::Bf16, 2.7, 0.97),
        ];
        assert_eq!(choose(&no_amx, 0.95), Precision::Fp32Fast);
        let inaccurate = [
            m(Precision::Fp32, 2.5, 1.0),
            m(Precision::Fp32Fast, 2.6, 1.0),
            m(Precision::Bf16, 0.8, 0.5),
        ];
        assert_eq!(choose(&inaccurate, 0.95), Precision::Fp32);
    }

    /// bf16 is tried on a CPU only where it has bf16 instructions; fp16 only on CUDA.
    #[test]
    fn candidates_follow_the_device_and_the_cpu() {
        use Precision::*;
        assert_eq!(candidates_where(Device::Cpu, false), [Fp32, Fp32Fast]);
        assert_eq!(candidates_where(Device::Cpu, true), [Fp32, Fp32Fast, Bf16]);
        assert_eq!(
            candidates_where(Device::Cuda(0), false),
            [Fp32, Fp32Fast, Bf16, Fp16]
        );
    }

    /// The trial with injected timings and agreements: keeps the model it chose.
    #[test]
    fn the_trial_keeps_the_chosen_model() {
        let timings = |fast: f64, bf16: f64, bf16_answer: i32| {
            move |p: Precision| -> Result<(Precision, f64, i32), ModelError> {
                Ok(match p {
                    Precision::Fp32Fast => (p, fast, 100),
                    Precision::Bf16 => (p, bf16, bf16_answer),
                    _ => (p, 2.0, 100),
                })
            }
        };
        let agree = |r: &i32, o: &i32| f64::from(100 - (r - o).abs()) / 100.0;
        let cands = candidates_where(Device::Cpu, true);
        let (model, d) = trial(&cands, 0.95, timings(1.5, 0.5, 100), agree).unwrap();
        assert_eq!((model, d.chosen.as_str()), (Precision::Bf16, "bf16"));
        let (model, d) = trial(&cands, 0.95, timings(1.5, 2.5, 100), agree).unwrap();
        assert_eq!(
            (model, d.chosen.as_str()),
            (Precision::Fp32Fast, "fp32-fast")
        );
        let (model, d) = trial(&cands, 0.95, timings(1.5, 0.5, 90), agree).unwrap();
        assert_eq!(
            (model, d.chosen.as_str()),
            (Precision::Fp32Fast, "fp32-fast")
        );
        assert_eq!(d.measured[2].agreement, 0.9);
    }

    #[test]
    fn the_cache_returns_what_was_put_for_the_same_key_only() {
        let dir = std::env::temp_dir().join(format!("detectd-autotune-{}", std::process::id()));
        let cache = DecisionCache::new(&dir);
        let key = TrialKey {
            processor: "cpu".into(),
            libtorch: "x".into(),
            threads: 2,
            device: "cpu".into(),
            arch: "resnet50".into(),
            batch: 4,
            weights: "abc".into(),
        };
        let decision = Decision {
            chosen: "bf16".into(),
            min_agreement: 0.95,
            measured: vec![m(Precision::Bf16, 1.0, 1.0)],
            trial_seconds: 3.0,
            source: Source::Trial,
        };
        assert!(cache.get(&key).is_none());
        let _lock = cache.lock().unwrap();
        cache.put(&key, &decision).unwrap();
        let got = cache.get(&key).unwrap();
        assert_eq!(got.source, Source::Cache);
        assert_eq!(got.precision(), Some(Precision::Bf16));
        let other = TrialKey {
            batch: 8,
            ..key.clone()
        };
        assert!(cache.get(&other).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
