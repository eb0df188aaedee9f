//! Checkpoints: `DIR/step-NNNNNNNN/` holds `model.safetensors` (tensors named
//! by the spec's parameter paths), `optimizer.safetensors` (`m.PATH`,
//! `v.PATH`) and `state.json`; `DIR/latest` names the newest one.
//!
//! Tensors are logical, whatever the layout that trained them: the ranks'
//! shards are assembled first (`train::ranks`), expert weights are indexed by
//! global expert id, and `state.json` records the writing layout under
//! `layout`. A checkpoint loads under any layout.
//!
//! Atomic: a checkpoint is written into a temporary folder and renamed into
//! place, then `latest` is replaced by writing a temporary file and renaming
//! it. A crash at any point leaves `latest` naming a complete checkpoint.

use super::TrainError;
use super::optim::OptimizerState;
use crate::tensor::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tessera_compiler::Model;

fn io(e: impl std::fmt::Display, what: &Path) -> TrainError {
    TrainError::Io(format!("{}: {e}", what.display()))
}

fn bytes(t: &Tensor<f32>) -> Vec<u8> {
    t.data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_tensors(
    path: &Path,
    named: Vec<(String, &Tensor<f32>)>,
    meta: HashMap<String, String>,
) -> Result<(), TrainError> {
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> =
        named.into_iter().map(|(n, t)| (n, bytes(t), t.dims.iter().map(|d| d.size as usize).collect())).collect();
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| io(e, path))?)))
        .collect::<Result<_, TrainError>>()?;
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| io(e, path))?;
    std::fs::write(path, data).map_err(|e| io(e, path))
}

/// Write a file atomically (temporary file + rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(|e| io(e, &tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| io(e, path))
}

pub fn save(
    out: &Path,
    model: &Model,
    params: &[Tensor<f32>],
    opt: &OptimizerState,
    step: u64,
    spec: Option<&(PathBuf, Vec<String>)>,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(out).map_err(|e| io(e, out))?;
    let name = format!("step-{step:08}");
    let tmp = out.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(e, &tmp))?;
    let mut meta = HashMap::new();
    meta.insert("model".to_string(), model.name.clone());
    meta.insert("step".to_string(), step.to_string());
    let named = model.params.iter().zip(params).map(|(p, t)| (p.path.clone(), t)).collect();
    write_tensors(&tmp.join("model.safetensors"), named, meta.clone())?;
    let mut named: Vec<(String, &Tensor<f32>)> = Vec::new();
    for (p, t) in model.params.iter().zip(&opt.m) {
        named.push((format!("m.{}", p.path), t));
    }
    for (p, t) in model.params.iter().zip(&opt.v) {
        named.push((format!("v.{}", p.path), t));
    }
    write_tensors(&tmp.join("optimizer.safetensors"), named, meta)?;
    let state = serde_json::json!({
        "model": model.name,
        "step": step,
        "optimizer": opt.optimizer,
        "spec": spec.map(|(p, _)| p.to_string_lossy().into_owned()),
        "overrides": spec.map(|(_, o)| o.clone()).unwrap_or_default(),
        // The tensors are logical (unsharded; expert weights indexed by global
        // expert id): this records the layout that wrote them, and any layout loads them.
        "layout": {
            "tensors": "logical",
            "mesh": model.parallel.mesh,
            "rules": model.parallel.layout,
            "zero": model.parallel.zero,
            "sequence_parallel": model.parallel.sequence_parallel,
            "experts": model.parallel.experts.as_ref().map(|e| &e.placement),
        },
    });
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&state).unwrap_or_default())
        .map_err(|e| io(e, &tmp))?;
    let dest = out.join(&name);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).map_err(|e| io(e, &dest))?;
    write_atomic(&out.join("latest"), name.as_bytes())?;
    Ok(dest)
}

/// The checkpoint folder a path names: a `step-*` folder, or a run folder with `latest`.
pub fn resolve(dir: &Path) -> Result<PathBuf, TrainError> {
    if dir.join("model.safetensors").is_file() {
        return Ok(dir.to_path_buf());
    }
    let latest = std::fs::read_to_string(dir.join("latest")).map_err(|_| {
        TrainError::Io(format!("`{}` holds no checkpoint (no `latest` and no model.safetensors)", dir.display()))
    })?;
    Ok(dir.join(latest.trim()))
}

fn read_tensors(path: &Path, model: &Model, prefix: &str) -> Result<Vec<Tensor<f32>>, TrainError> {
    let buf = std::fs::read(path).map_err(|e| io(e, path))?;
    let st = safetensors::SafeTensors::deserialize(&buf).map_err(|e| io(e, path))?;
    model
        .params
        .iter()
        .map(|p| {
            let name = format!("{prefix}{}", p.path);
            let view = st.tensor(&name).map_err(|_| {
                TrainError::Setup(format!(
                    "checkpoint `{}` has no tensor `{name}`: was it written by another spec?",
                    path.display()
                ))
            })?;
            let want: Vec<usize> = p.ty.dims.iter().map(|d| d.size as usize).collect();
            if view.shape() != want.as_slice() || view.dtype() != Dtype::F32 {
                return Err(TrainError::Setup(format!(
                    "checkpoint tensor `{name}` is {:?} {:?}, the spec says {}",
                    view.dtype(),
                    view.shape(),
                    p.ty
                )));
            }
            let data = view.data().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Ok(Tensor { dims: p.ty.dims.clone(), data })
        })
        .collect()
}

/// The parameters of a checkpoint (for sampling).
pub fn load_params(dir: &Path, model: &Model) -> Result<Vec<Tensor<f32>>, TrainError> {
    read_tensors(&resolve(dir)?.join("model.safetensors"), model, "")
}

/// The spec path and overrides a checkpoint was trained with.
pub fn spec_of(dir: &Path) -> Result<(Option<PathBuf>, Vec<String>), TrainError> {
    let dir = resolve(dir)?;
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).map_err(|e| io(e, &dir))?)
            .map_err(|e| io(e, &dir))?;
    let spec = state["spec"].as_str().map(PathBuf::from);
    let overrides = state["overrides"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    Ok((spec, overrides))
}

pub fn load(
    dir: &Path,
    model: &Model,
    opt: &OptimizerState,
) -> Result<(Vec<Tensor<f32>>, OptimizerState, u64), TrainError> {
    let dir = resolve(dir)?;
    let params = read_tensors(&dir.join("model.safetensors"), model, "")?;
    let mut opt = opt.clone();
    let o = dir.join("optimizer.safetensors");
    opt.m = read_tensors(&o, model, "m.")?;
    if !opt.v.is_empty() {
        opt.v = read_tensors(&o, model, "v.")?;
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).map_err(|e| io(e, &dir))?)
            .map_err(|e| io(e, &dir))?;
    let step =
        state["step"].as_u64().ok_or_else(|| TrainError::Io(format!("{}: state.json has no step", dir.display())))?;
    Ok((params, opt, step))
}
