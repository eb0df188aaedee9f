//! Checkpoints: `DIR/step-NNNNNNNN/` holds `model.safetensors` (tensors named
//! by the spec's parameter paths), `optimizer.safetensors` (`m.PATH`,
//! `v.PATH`), `state.json`, and for a LoRA run `adapters.safetensors` (the
//! adapters alone); `DIR/latest` names the newest one.
//!
//! Tensors are logical, whatever the layout that trained them: the ranks'
//! shards are assembled first (`train::ranks`), expert weights are indexed by
//! global expert id, and `state.json` records the writing layout under
//! `layout`. A checkpoint loads under any layout.
//!
//! Atomic: a checkpoint is written into `.tmp-step-N-PID/` and renamed into
//! place; when `step-N` already exists the two are exchanged in one
//! `renameat2(RENAME_EXCHANGE)` (elsewhere the old one is renamed aside
//! first, and put back on the next start if a kill came in between). Then
//! `latest` is replaced by writing a temporary file and renaming it. A crash
//! at any point leaves `latest` naming a complete checkpoint.
//!
//! Verified: each safetensors file carries a CRC-32 of every tensor's bytes
//! and one of its header (names, dtypes, shapes, offsets and the tensor
//! checksums) in its metadata; loading checks them all and names the tensor
//! that fails. `state.json` records the run (spec and its hash, overrides,
//! seed, data and its hash, tokenizer, optimizer) so that a resume continues
//! the same run (`RunRecord`).

use super::TrainError;
use super::optim::{LossScaler, OptimizerState};
use crate::tensor::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use tessera_compiler::config::StateRole;
use tessera_compiler::driver::Training;
use tessera_compiler::ir::{Dim, Param};

pub(crate) fn io(e: impl std::fmt::Display, what: &Path) -> TrainError {
    TrainError::Io(format!("{}: {e}", what.display()))
}

fn bytes(t: &Tensor<f32>) -> Vec<u8> {
    t.data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Metadata keys of the checksums.
pub(crate) const TENSOR_CRC: &str = "tessera.crc32";
const HEADER_CRC: &str = "tessera.header_crc32";

/// The CRC-32 of a header: every tensor's name, dtype, shape and offsets, in
/// name order, then the tensor checksums as stored.
fn header_crc(tensors: &HashMap<String, &safetensors::tensor::TensorInfo>, tensor_crcs: &str) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let sorted: BTreeMap<_, _> = tensors.iter().collect();
    for (name, info) in sorted {
        h.update(format!("{name}:{:?}:{:?}:{:?};", info.dtype, info.shape, info.data_offsets).as_bytes());
    }
    h.update(tensor_crcs.as_bytes());
    h.finalize()
}

pub(crate) fn write_tensors(
    path: &Path,
    named: Vec<(String, &Tensor<f32>)>,
    mut meta: HashMap<String, String>,
) -> Result<(), TrainError> {
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> =
        named.into_iter().map(|(n, t)| (n, bytes(t), t.dims.iter().map(|d| d.size as usize).collect())).collect();
    let crcs: BTreeMap<&str, String> =
        raw.iter().map(|(n, b, _)| (n.as_str(), format!("{:08x}", crc32fast::hash(b)))).collect();
    let crcs = serde_json::to_string(&crcs).unwrap_or_default();
    let views = |meta: HashMap<String, String>| -> Result<Vec<u8>, TrainError> {
        let views: Vec<(String, TensorView)> = raw
            .iter()
            .map(|(n, b, s)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| io(e, path))?)))
            .collect::<Result<_, TrainError>>()?;
        safetensors::serialize(views, Some(meta)).map_err(|e| io(e, path))
    };
    // The header checksum covers the offsets, which serialization decides:
    // serialize once to learn them (the metadata's length does not move them).
    meta.insert(TENSOR_CRC.into(), crcs.clone());
    let first = views(meta.clone())?;
    let (_, m) = safetensors::SafeTensors::read_metadata(&first).map_err(|e| io(e, path))?;
    meta.insert(HEADER_CRC.into(), format!("{:08x}", header_crc(&m.tensors(), &crcs)));
    std::fs::write(path, views(meta)?).map_err(|e| io(e, path))
}

/// Write a file atomically (temporary file + rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(|e| io(e, &tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| io(e, path))
}

/// What a run was started with, recorded in every checkpoint's `state.json`
/// and compared on resume.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// The spec file (canonical path) and the SHA-256 of its text.
    pub spec: Option<String>,
    pub spec_sha256: Option<String>,
    /// The `--set` overrides, as typed.
    pub overrides: Vec<String>,
    pub seed: u64,
    /// The data file (canonical path) and the SHA-256 of its bytes.
    pub data: String,
    pub data_sha256: String,
    pub tokenizer: String,
    /// The optimizer and its hyperparameters, as the spec states them.
    pub optimizer: serde_json::Value,
}

impl RunRecord {
    /// What differs from `then` (the checkpoint's record), one line each.
    /// Layout overrides (`parallel.*`) may change freely: checkpoints are logical.
    pub fn changes_from(&self, then: &RunRecord) -> Vec<String> {
        let mut out = Vec::new();
        // Overrides as a map, path → value, the last one of a path winning.
        let model_overrides = |r: &RunRecord| -> BTreeMap<String, String> {
            r.overrides
                .iter()
                .filter(|o| !o.starts_with("parallel."))
                .map(|o| match o.split_once('=') {
                    Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
                    None => (o.clone(), String::new()),
                })
                .collect()
        };
        if self.spec_sha256 != then.spec_sha256 {
            out.push(format!(
                "the spec's text changed (`{}` had SHA-256 {}, `{}` has {})",
                then.spec.as_deref().unwrap_or("?"),
                short(then.spec_sha256.as_deref()),
                self.spec.as_deref().unwrap_or("?"),
                short(self.spec_sha256.as_deref())
            ));
        }
        let (a, b) = (model_overrides(then), model_overrides(self));
        if a != b {
            let show =
                |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
            out.push(format!(
                "the overrides changed (were `{}`, now `{}`; `parallel.*` may change freely)",
                show(&a),
                show(&b)
            ));
        }
        if self.seed != then.seed {
            out.push(format!("the seed changed (was {}, now {})", then.seed, self.seed));
        }
        if self.data_sha256 != then.data_sha256 {
            out.push(format!(
                "the data changed (`{}` had SHA-256 {}, `{}` has {})",
                then.data,
                short(Some(&then.data_sha256)),
                self.data,
                short(Some(&self.data_sha256))
            ));
        }
        if self.tokenizer != then.tokenizer {
            out.push(format!("the tokenizer changed (was {}, now {})", then.tokenizer, self.tokenizer));
        }
        if self.optimizer != then.optimizer {
            out.push(format!("the optimizer changed (was {}, now {})", then.optimizer, self.optimizer));
        }
        out
    }

    /// Whether the optimizer state of `then` has another meaning here
    /// (AdamW's moments are not SGD's momentum).
    pub fn optimizer_kind_changed(&self, then: &RunRecord) -> bool {
        self.optimizer.get("kind") != then.optimizer.get("kind")
    }
}

fn short(h: Option<&str>) -> String {
    h.map(|h| h.chars().take(12).collect()).unwrap_or_else(|| "none".into())
}

/// SHA-256 of bytes, in hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// The folder of step `step`'s checkpoint under `out`.
pub fn step_dir(out: &Path, step: u64) -> PathBuf {
    out.join(format!("step-{step:08}"))
}

/// A checkpoint to write: what it records, taken from the run when the
/// save is asked for, so that the writing can happen later (in the
/// background) with the tensors it owns.
pub struct Snapshot {
    model: String,
    step: u64,
    /// Parameter paths, in the tensors' order.
    paths: Vec<String>,
    state: serde_json::Value,
    params: Vec<Tensor<f32>>,
    opt: OptimizerState,
    /// The LoRA adapters among the parameters (`train.lora`), by index.
    adapters: Vec<usize>,
}

impl Snapshot {
    /// Step `step` of `model`'s run `run`, holding `params` and `opt`.
    pub fn new(
        model: &Training,
        params: Vec<Tensor<f32>>,
        opt: OptimizerState,
        step: u64,
        run: Option<&RunRecord>,
    ) -> Snapshot {
        let state = state_json(model, &opt, step, run, "logical");
        let paths = model.step.params.iter().map(|p| p.path.clone()).collect();
        let adapters = (0..model.step.params.len()).filter(|&k| model.step.params[k].adapter_of.is_some()).collect();
        Snapshot { model: model.name.clone(), step, paths, state, params, opt, adapters }
    }

    /// Write it under `out` as `step-N`, atomically: into a temporary
    /// folder, renamed into place, then `latest` pointed at it. A write cut
    /// short leaves the previous checkpoint the latest.
    pub fn write(&self, out: &Path) -> Result<PathBuf, TrainError> {
        std::fs::create_dir_all(out).map_err(|e| io(e, out))?;
        let name = format!("step-{:08}", self.step);
        let tmp = out.join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io(e, &tmp))?;
        let mut meta = HashMap::new();
        meta.insert("model".to_string(), self.model.clone());
        meta.insert("step".to_string(), self.step.to_string());
        let named = self.paths.iter().cloned().zip(&self.params).collect();
        write_tensors(&tmp.join("model.safetensors"), named, meta.clone())?;
        let mut named: Vec<(String, &Tensor<f32>)> = Vec::new();
        for (p, state) in self.paths.iter().zip(&self.opt.state) {
            named.extend(state.iter().map(|(role, t)| (format!("{}.{p}", role.prefix()), t)));
        }
        // A LoRA run's adapters alone (a few MB), to apply to the base weights elsewhere.
        if !self.adapters.is_empty() {
            let named = self.adapters.iter().map(|&k| (self.paths[k].clone(), &self.params[k])).collect();
            write_tensors(&tmp.join("adapters.safetensors"), named, meta.clone())?;
        }
        write_tensors(&tmp.join("optimizer.safetensors"), named, meta)?;
        std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&self.state).unwrap_or_default())
            .map_err(|e| io(e, &tmp))?;
        sync_dir(&tmp);
        let dest = out.join(&name);
        replace_dir(&tmp, &dest)?;
        write_atomic(&out.join("latest"), name.as_bytes())?;
        sync_dir(out);
        Ok(dest)
    }
}

/// A checkpoint's `state.json`: the step, the optimizer's kind and loss
/// scale, the run, and the layout that wrote its tensors (`tensors`:
/// `logical`, or `sharded` pieces with a manifest); any layout loads both.
pub fn state_json(
    model: &Training,
    opt: &OptimizerState,
    step: u64,
    run: Option<&RunRecord>,
    tensors: &str,
) -> serde_json::Value {
    serde_json::json!({
        "model": model.name,
        "step": step,
        "optimizer": opt.optimizer,
        "loss_scale": opt.scaler,
        "skipped_steps": opt.skipped,
        "spec": run.and_then(|r| r.spec.clone()),
        "overrides": run.map(|r| r.overrides.clone()).unwrap_or_default(),
        "run": run,
        // Logical tensors (unsharded; expert weights indexed by global expert
        // id) or sharded pieces: this records the layout that wrote them, and
        // any layout loads them.
        "layout": {
            "tensors": tensors,
            "mesh": model.parallel.mesh,
            "rules": model.parallel.layout,
            "zero": model.parallel.zero,
            "sequence_parallel": model.parallel.sequence_parallel,
            "experts": model.parallel.experts.as_ref().map(|e| &e.placement),
        },
    })
}

/// Write a checkpoint of step `step` under `out` now (see [`Snapshot::write`]).
pub fn save(
    out: &Path,
    model: &Training,
    params: &[Tensor<f32>],
    opt: &OptimizerState,
    step: u64,
    run: Option<&RunRecord>,
) -> Result<PathBuf, TrainError> {
    Snapshot::new(model, params.to_vec(), opt.clone(), step, run).write(out)
}

/// Flush a folder's entries to disk (best effort: not every platform can).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Put the folder `new` at `dest`, with no moment where `dest` is missing
/// once it existed.
pub(crate) fn replace_dir(new: &Path, dest: &Path) -> Result<(), TrainError> {
    if !dest.exists() {
        return std::fs::rename(new, dest).map_err(|e| io(e, dest));
    }
    #[cfg(target_os = "linux")]
    {
        if exchange(new, dest).is_ok() {
            // `new` now holds the old checkpoint.
            let _ = std::fs::remove_dir_all(new);
            return Ok(());
        }
    }
    // Without an atomic exchange: the old folder goes aside, the new one in;
    // `recover` puts the old one back if a kill comes in between.
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = dest.with_file_name(format!(".old-{name}-{}", std::process::id()));
    std::fs::rename(dest, &aside).map_err(|e| io(e, dest))?;
    std::fs::rename(new, dest).map_err(|e| io(e, dest))?;
    let _ = std::fs::remove_dir_all(&aside);
    Ok(())
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as given.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Tidy a run folder after a killed run: remove half-written `.tmp-step-*`
/// folders and `latest.tmp`, and put back a checkpoint left aside by an
/// interrupted replacement. Returns what it removed or restored.
pub fn recover(out: &Path) -> Vec<String> {
    let mut done = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else { return done };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-step-") {
            if std::fs::remove_dir_all(e.path()).is_ok() {
                done.push(format!("removed the unfinished checkpoint `{name}`"));
            }
        } else if let Some(rest) = name.strip_prefix(".old-") {
            // `.old-step-N-PID`: the step folder it came from.
            let step = rest.rsplit_once('-').map(|(s, _)| s).unwrap_or(rest);
            let dest = out.join(step);
            if dest.join("state.json").is_file() {
                let _ = std::fs::remove_dir_all(e.path());
            } else {
                let _ = std::fs::remove_dir_all(&dest);
                if std::fs::rename(e.path(), &dest).is_ok() {
                    done.push(format!("restored `{step}` from an interrupted save"));
                }
            }
        } else if name == "latest.tmp" {
            let _ = std::fs::remove_file(e.path());
        }
    }
    done
}

/// An advisory lock on a run folder (`DIR/.lock`, which names the holder's
/// pid), held while the value lives. A second run into the same folder is
/// refused; the lock goes with the process, however it ends.
pub struct RunLock {
    _file: File,
}

pub fn lock(out: &Path) -> Result<RunLock, TrainError> {
    use std::io::{Read as _, Seek as _, Write as _};
    std::fs::create_dir_all(out).map_err(|e| io(e, out))?;
    let path = out.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io(e, &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(TrainError::Setup(format!(
                "`{}` is in use by another run ({}); wait for it to finish, or pass another --out",
                out.display(),
                holder.trim()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e, &path)),
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "pid {}", std::process::id());
    let _ = file.flush();
    Ok(RunLock { _file: file })
}

/// Whether a folder holds (part of) a run: a `latest`, a checkpoint or metrics.
pub fn holds_run(out: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(out) else { return false };
    entries.flatten().any(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n == "latest" || n.starts_with("step-") || (n == "metrics.jsonl" && e.metadata().is_ok_and(|m| m.len() > 0))
    })
}

/// Remove a previous run's checkpoints, `latest` and metrics (`--overwrite`).
pub fn clear_run(out: &Path) -> Result<(), TrainError> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if n.starts_with("step-") {
            std::fs::remove_dir_all(&path).map_err(|e| io(e, &path))?;
        } else if n == "latest" || n == "metrics.jsonl" {
            std::fs::remove_file(&path).map_err(|e| io(e, &path))?;
        }
    }
    Ok(())
}

/// The checkpoint folder a path names: a `step-*` folder, or a run folder with `latest`.
pub fn resolve(dir: &Path) -> Result<PathBuf, TrainError> {
    if holds_checkpoint(dir) {
        return Ok(dir.to_path_buf());
    }
    if !dir.is_dir() {
        return Err(TrainError::Io(format!(
            "`{}` is not a folder; pass a run folder (with `latest`) or a `step-*` folder",
            dir.display()
        )));
    }
    let latest_path = dir.join("latest");
    let latest = std::fs::read_to_string(&latest_path).map_err(|_| {
        TrainError::Io(format!(
            "`{}` holds no checkpoint: it has no `latest` file and no model.safetensors; pass a run folder written by \
             `tessera train` or one of its `step-*` folders",
            dir.display()
        ))
    })?;
    let name = latest.trim();
    if name.is_empty() || name.contains('/') || name.contains('\\') {
        return Err(TrainError::Io(format!(
            "`{}` is {}; it should name a `step-*` folder beside it (write the newest one's name into it, or pass that \
             folder)",
            latest_path.display(),
            if name.is_empty() { "empty".to_string() } else { format!("`{name}`") }
        )));
    }
    let step = dir.join(name);
    if !holds_checkpoint(&step) {
        return Err(TrainError::Io(format!(
            "`{}` names `{name}`, but `{}` holds no model.safetensors; pass an intact `step-*` folder instead",
            latest_path.display(),
            step.display()
        )));
    }
    Ok(step)
}

/// Explain a safetensors error as a damaged file.
fn damaged(path: &Path, e: safetensors::SafeTensorError) -> TrainError {
    use safetensors::SafeTensorError as E;
    let why = match &e {
        E::HeaderTooSmall | E::InvalidHeaderLength | E::MetadataIncompleteBuffer => {
            "it is truncated or has bytes appended (its header and its size disagree)".to_string()
        }
        E::InvalidHeader(_) | E::InvalidHeaderStart | E::InvalidHeaderDeserialization(_) | E::JsonError(_) => {
            "its header is not valid".to_string()
        }
        E::HeaderTooLarge => "its header claims an impossible size".to_string(),
        other => format!("{other}"),
    };
    TrainError::Io(format!(
        "checkpoint file `{}` is damaged: {why}. Resume from an older `step-*` folder, or retrain",
        path.display()
    ))
}

/// Read a safetensors file and check its checksums.
fn read_verified(path: &Path) -> Result<Vec<u8>, TrainError> {
    let buf = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TrainError::Io(format!(
            "checkpoint file `{}` is missing; the checkpoint is incomplete, pass an intact `step-*` folder",
            path.display()
        )),
        _ => io(e, path),
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&buf).map_err(|e| damaged(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&buf).map_err(|e| damaged(path, e))?;
    let fields = meta.metadata().clone().unwrap_or_default();
    let (Some(crcs), Some(header)) = (fields.get(TENSOR_CRC), fields.get(HEADER_CRC)) else {
        return Err(TrainError::Io(format!(
            "checkpoint file `{}` carries no checksums, so it cannot be verified; it was not written by this \
             version of `tessera train`",
            path.display()
        )));
    };
    if format!("{:08x}", header_crc(&meta.tensors(), crcs)) != *header {
        return Err(TrainError::Io(format!(
            "checkpoint file `{}` is damaged: its header (tensor names, shapes or offsets) fails its checksum. \
             Resume from an older `step-*` folder, or retrain",
            path.display()
        )));
    }
    let crcs: BTreeMap<String, String> = serde_json::from_str(crcs).map_err(|e| io(e, path))?;
    for (name, view) in st.iter() {
        let want = crcs.get(name).map(String::as_str).unwrap_or("none");
        if format!("{:08x}", crc32fast::hash(view.data())) != want {
            return Err(TrainError::Io(format!(
                "checkpoint tensor `{name}` in `{}` fails its checksum: its bytes changed after it was written. \
                 Resume from an older `step-*` folder, or retrain",
                path.display()
            )));
        }
    }
    Ok(buf)
}

/// Read a safetensors file once, verify it, and take the model's parameters
/// (the weights of a `model.safetensors`).
fn read_tensors(path: &Path, params: &[Param]) -> Result<Vec<Tensor<f32>>, TrainError> {
    let named: Vec<(String, &[Dim])> = params.iter().map(|p| (p.path.clone(), p.ty.dims.as_slice())).collect();
    read_named(path, &named)
}

/// Read a safetensors file once, verify it, and take the tensors of these
/// names and dims.
fn read_named(path: &Path, named: &[(String, &[Dim])]) -> Result<Vec<Tensor<f32>>, TrainError> {
    let buf = read_verified(path)?;
    let st = safetensors::SafeTensors::deserialize(&buf).map_err(|e| damaged(path, e))?;
    let one = |name: &str, dims: &[Dim]| -> Result<Tensor<f32>, TrainError> {
        let view = st.tensor(name).map_err(|_| {
            TrainError::Setup(format!(
                "checkpoint `{}` has no tensor `{name}`: was it written by another spec?",
                path.display()
            ))
        })?;
        let want: Vec<usize> = dims.iter().map(|d| d.size as usize).collect();
        if view.shape() != want.as_slice() || view.dtype() != Dtype::F32 {
            return Err(TrainError::Setup(format!(
                "checkpoint tensor `{name}` is {:?} {:?}, the spec says f32{want:?}",
                view.dtype(),
                view.shape(),
            )));
        }
        let data = view.data().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let t = Tensor { dims: dims.to_vec(), data };
        if !t.is_finite() {
            return Err(TrainError::Setup(format!(
                "checkpoint tensor `{name}` in `{}` holds non-finite values (NaN or infinity); the run that \
                 wrote it had diverged. Resume from an older `step-*` folder",
                path.display()
            )));
        }
        Ok(t)
    };
    named.iter().map(|(name, dims)| one(name, dims)).collect()
}

/// Write logical weights to one safetensors file (as a checkpoint's
/// `model.safetensors`: named by parameter path, with checksums),
/// atomically.
pub fn write_params(path: &Path, params: &[Param], tensors: &[Tensor<f32>]) -> Result<(), TrainError> {
    if params.len() != tensors.len() {
        return Err(TrainError::Setup(format!("{} tensors for {} parameters", tensors.len(), params.len())));
    }
    for (p, t) in params.iter().zip(tensors) {
        if p.ty.dims.iter().map(|d| d.size).ne(t.dims.iter().map(|d| d.size)) {
            return Err(TrainError::Setup(format!("`{}` is {}, but the tensor given is {:?}", p.path, p.ty, t.dims)));
        }
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    write_tensors(&tmp, params.iter().map(|p| p.path.clone()).zip(tensors).collect(), HashMap::new())?;
    std::fs::rename(&tmp, path).map_err(|e| io(e, path))
}

/// Logical weights from a safetensors file written by [`write_params`] or
/// a checkpoint's `model.safetensors`, verified, as `params` describes them.
pub fn read_params(path: &Path, params: &[Param]) -> Result<Vec<Tensor<f32>>, TrainError> {
    read_tensors(path, params)
}

/// The parameters of a checkpoint (for sampling), as `params` describes them.
pub fn load_params(dir: &Path, params: &[Param]) -> Result<Vec<Tensor<f32>>, TrainError> {
    let dir = resolve(dir)?;
    if super::sharded::is_sharded(&dir) {
        let mut reader = super::sharded::Reader::open(&dir)?;
        return params.iter().map(|p| reader.logical(&p.path, super::sharded::Role::Weight, &p.ty.dims)).collect();
    }
    read_tensors(&dir.join("model.safetensors"), params)
}

pub(crate) fn state_of(dir: &Path) -> Result<serde_json::Value, TrainError> {
    let path = dir.join("state.json");
    let text = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TrainError::Io(format!(
            "`{}` is missing: the checkpoint `{}` is incomplete; pass an intact `step-*` folder",
            path.display(),
            dir.display()
        )),
        _ => io(e, &path),
    })?;
    serde_json::from_slice(&text)
        .map_err(|e| TrainError::Io(format!("`{}` is not valid JSON ({e}); the checkpoint is damaged", path.display())))
}

/// The spec path and overrides a checkpoint was trained with.
pub fn spec_of(dir: &Path) -> Result<(Option<PathBuf>, Vec<String>), TrainError> {
    let state = state_of(&resolve(dir)?)?;
    let spec = state["spec"].as_str().map(PathBuf::from);
    let overrides = state["overrides"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    Ok((spec, overrides))
}

/// The run a checkpoint belongs to, as its `state.json` records it.
pub fn run_of(dir: &Path) -> Result<Option<RunRecord>, TrainError> {
    let state = state_of(&resolve(dir)?)?;
    Ok(serde_json::from_value(state["run"].clone()).ok())
}

/// Whether `path` is a Tessera checkpoint: a run folder or a `step-*` folder.
pub fn is_checkpoint(path: &Path) -> bool {
    path.is_dir() && (path.join("state.json").is_file() || path.join("latest").exists())
}

/// Whether `dir` is a checkpoint folder: one file of logical tensors, or a
/// sharded checkpoint's manifest.
fn holds_checkpoint(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || super::sharded::is_sharded(dir)
}

/// Load a checkpoint: the weights, the optimizer state (left as `opt` when
/// `fresh_optimizer`) and the step. A sharded checkpoint is assembled into
/// logical tensors (a rank that needs only its cuts reads them with
/// `sharded::Reader`).
pub fn load(
    dir: &Path,
    meta: &[Param],
    opt: &OptimizerState,
    fresh_optimizer: bool,
) -> Result<(Vec<Tensor<f32>>, OptimizerState, u64), TrainError> {
    use super::sharded::Role;
    let dir = resolve(dir)?;
    let state = state_of(&dir)?;
    let mut opt = opt.clone();
    // Every state tensor the optimizer keeps: (parameter, role, logical dims).
    let kept: Vec<(usize, StateRole, Vec<Dim>)> = meta
        .iter()
        .enumerate()
        .flat_map(|(k, p)| {
            let dims = &p.ty.dims;
            opt.optimizer.state(dims, dims).into_iter().map(move |(role, d)| (k, role, d))
        })
        .collect();
    let (params, moments) = if super::sharded::is_sharded(&dir) {
        let mut reader = super::sharded::Reader::open(&dir)?;
        let params: Vec<_> =
            meta.iter().map(|p| reader.logical(&p.path, Role::Weight, &p.ty.dims)).collect::<Result<_, _>>()?;
        let moments = match fresh_optimizer {
            true => Vec::new(),
            false => kept
                .iter()
                .map(|(k, role, dims)| reader.logical(&meta[*k].path, Role::State(*role), dims))
                .collect::<Result<_, _>>()?,
        };
        (params, moments)
    } else {
        let params = read_tensors(&dir.join("model.safetensors"), meta)?;
        let moments = match fresh_optimizer {
            true => Vec::new(),
            false => {
                let named: Vec<(String, &[Dim])> = kept
                    .iter()
                    .map(|(k, role, dims)| (format!("{}.{}", role.prefix(), meta[*k].path), dims.as_slice()))
                    .collect();
                read_named(&dir.join("optimizer.safetensors"), &named)?
            }
        };
        (params, moments)
    };
    for ((k, role, _), t) in kept.iter().zip(moments) {
        *opt.get_mut(*k, *role).ok_or_else(|| TrainError::Setup("optimizer state of another shape".into()))? = t;
    }
    let (step, scaler, skipped) = progress(&dir, &state)?;
    opt.scaler = scaler;
    opt.skipped = skipped;
    Ok((params, opt, step))
}

/// Where a checkpoint's run stood, from its `state.json` (`state`, read
/// from folder `dir`): the step, the loss scale (`precision = fp16`) and the
/// steps skipped so far.
pub fn progress(dir: &Path, state: &serde_json::Value) -> Result<(u64, Option<LossScaler>, u64), TrainError> {
    let step = state["step"]
        .as_u64()
        .ok_or_else(|| TrainError::Io(format!("`{}` has no `step`", dir.join("state.json").display())))?;
    let scaler = serde_json::from_value(state["loss_scale"].clone()).ok().flatten();
    Ok((step, scaler, state["skipped_steps"].as_u64().unwrap_or(0)))
}
