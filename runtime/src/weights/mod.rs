//! Published weights on disk, read as named f32 tensors: safetensors (one
//! file, or a sharded checkpoint's `model.safetensors.index.json` and its
//! files) and GGUF (llama.cpp's format; F32, F16, BF16, Q8_0, Q4_0 and Q4_1
//! dequantized on load, [`gguf`]). Opening reads the headers only; a tensor's
//! bytes are read when it is asked for.
//!
//! Shapes are outermost first, as PyTorch and safetensors give them (GGUF
//! lists its dims innermost first; they are reversed here).

pub mod gguf;
pub mod map;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct WeightsError {
    pub path: String,
    pub message: String,
}

impl WeightsError {
    pub fn new(path: &Path, message: impl Into<String>) -> WeightsError {
        WeightsError { path: path.display().to_string(), message: message.into() }
    }
}

/// A tensor of a weights file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Outermost first.
    pub shape: Vec<u64>,
    /// As the file names it: `F32`, `BF16`, `Q4_1`, ...
    pub dtype: String,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone)]
struct Place {
    file: usize,
    /// Byte offset in the file, and length.
    offset: u64,
    len: u64,
}

/// An opened weights file (or set of files).
#[derive(Debug)]
pub struct WeightFile {
    path: PathBuf,
    format: Format,
    files: Vec<PathBuf>,
    tensors: Vec<TensorInfo>,
    places: Vec<Place>,
    by_name: BTreeMap<String, usize>,
    /// GGUF's key-value metadata; safetensors' `__metadata__` as strings.
    pub metadata: BTreeMap<String, gguf::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    Gguf,
}

impl WeightFile {
    /// Open `path`: a `.safetensors` file, a `.gguf` file, a sharded
    /// checkpoint's `*.index.json`, or a folder holding one of those
    /// (`model.safetensors.index.json`, `model.safetensors`, or one `.gguf`).
    pub fn open(path: &Path) -> Result<WeightFile, WeightsError> {
        let path = resolve(path)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(".gguf") {
            gguf::open(&path)
        } else if name.ends_with(".index.json") {
            open_index(&path)
        } else if name.ends_with(".safetensors") {
            let mut w = WeightFile::empty(&path, Format::Safetensors);
            w.add_safetensors(&path)?;
            Ok(w)
        } else {
            Err(WeightsError::new(
                &path,
                "not a weights file Tessera reads: give a `.safetensors` file, a sharded checkpoint's \
                 `model.safetensors.index.json`, a `.gguf` file, or a folder holding one",
            ))
        }
    }

    fn empty(path: &Path, format: Format) -> WeightFile {
        WeightFile {
            path: path.to_path_buf(),
            format,
            files: Vec::new(),
            tensors: Vec::new(),
            places: Vec::new(),
            by_name: BTreeMap::new(),
            metadata: BTreeMap::new(),
        }
    }

    /// What was opened (the file, or the index).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Add a tensor found in file `file`.
    fn add(&mut self, info: TensorInfo, place: Place) -> Result<(), WeightsError> {
        if self.by_name.contains_key(&info.name) {
            let at = &self.files[place.file];
            return Err(WeightsError::new(at, format!("tensor `{}` appears twice", info.name)));
        }
        self.by_name.insert(info.name.clone(), self.tensors.len());
        self.tensors.push(info);
        self.places.push(place);
        Ok(())
    }

    /// Read the header of safetensors file `path` and add its tensors.
    fn add_safetensors(&mut self, path: &Path) -> Result<(), WeightsError> {
        let fail = |m: String| WeightsError::new(path, m);
        let mut f = std::fs::File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let size = f.metadata().map_err(|e| fail(e.to_string()))?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|_| fail("too short for a safetensors header".into()))?;
        let n = u64::from_le_bytes(n);
        if n > size.saturating_sub(8) || n > 100 << 20 {
            return Err(fail(format!("a safetensors header of {n} bytes does not fit a file of {size} bytes")));
        }
        let mut head = vec![0u8; n as usize];
        f.read_exact(&mut head).map_err(|e| fail(format!("reading the header: {e}")))?;
        let head: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&head).map_err(|e| fail(format!("not a safetensors file (its header: {e})")))?;
        let file = self.files.len();
        self.files.push(path.to_path_buf());
        let data = 8 + n;
        let mut found = Vec::new();
        for (name, t) in head {
            if name == "__metadata__" {
                for (k, v) in t.as_object().into_iter().flatten() {
                    self.metadata.insert(k.clone(), gguf::Value::Str(v.as_str().unwrap_or_default().to_string()));
                }
                continue;
            }
            let bad = || fail(format!("tensor `{name}`: its header entry needs `dtype`, `shape` and `data_offsets`"));
            let dtype = t.get("dtype").and_then(|d| d.as_str()).ok_or_else(bad)?.to_string();
            let shape: Vec<u64> = t
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(bad)?
                .iter()
                .map(|d| d.as_u64().ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            let o = t.get("data_offsets").and_then(|o| o.as_array()).ok_or_else(bad)?;
            let (start, end) = match o.as_slice() {
                [a, b] => (a.as_u64().ok_or_else(bad)?, b.as_u64().ok_or_else(bad)?),
                _ => return Err(bad()),
            };
            if start > end || data + end > size {
                return Err(fail(format!(
                    "tensor `{name}` needs bytes {}..{} but the file has {size}: it is cut short",
                    data + start,
                    data + end
                )));
            }
            found.push((
                start,
                TensorInfo { name, shape, dtype },
                Place { file, offset: data + start, len: end - start },
            ));
        }
        found.sort_by_key(|(start, _, _)| *start);
        for (_, info, place) in found {
            self.add(info, place)?;
        }
        Ok(())
    }

    /// Tensor `name`'s elements as f32, outermost dim first.
    pub fn read(&self, name: &str) -> Result<Vec<f32>, WeightsError> {
        let Some(&i) = self.by_name.get(name) else {
            return Err(WeightsError::new(&self.path, format!("has no tensor `{name}`")));
        };
        let (info, place) = (&self.tensors[i], &self.places[i]);
        let path = &self.files[place.file];
        let fail = |m: String| WeightsError::new(path, format!("tensor `{name}`: {m}"));
        let mut f = std::fs::File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        f.seek(SeekFrom::Start(place.offset)).map_err(|e| fail(e.to_string()))?;
        let mut bytes = vec![0u8; place.len as usize];
        f.read_exact(&mut bytes).map_err(|e| fail(format!("the file ends inside it ({e})")))?;
        let n = info.numel() as usize;
        let out = match self.format {
            Format::Gguf => gguf::dequantize(&info.dtype, &bytes, n),
            Format::Safetensors => floats(&info.dtype, &bytes, n),
        }
        .map_err(fail)?;
        Ok(out)
    }
}

/// Little-endian floats of `dtype` (`F32`, `F16`, `BF16`) as f32: `n` of them.
pub(crate) fn floats(dtype: &str, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let width = match dtype {
        "F32" => 4,
        "F16" | "BF16" => 2,
        other => return Err(format!("its dtype {other} is not one Tessera loads (F32, F16, BF16)")),
    };
    if bytes.len() != n * width {
        return Err(format!("{} bytes for {n} {dtype} values", bytes.len()));
    }
    Ok(match dtype {
        "F32" => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "F16" => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    })
}

/// The weights file a path names (a folder: the one it holds).
fn resolve(path: &Path) -> Result<PathBuf, WeightsError> {
    if !path.exists() {
        return Err(WeightsError::new(path, "does not exist"));
    }
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    for name in ["model.safetensors.index.json", "model.safetensors"] {
        if path.join(name).is_file() {
            return Ok(path.join(name));
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| WeightsError::new(path, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            n.ends_with(".gguf") || n.ends_with(".safetensors.index.json") || n.ends_with(".safetensors")
        })
        .collect();
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(WeightsError::new(path, "holds no `.safetensors`, `.safetensors.index.json` or `.gguf` file")),
        many => Err(WeightsError::new(
            path,
            format!(
                "holds {} weights files ({}): name the one to load",
                many.len(),
                many.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// A sharded safetensors checkpoint: its index's `weight_map` names each
/// tensor's file; every file's tensors are added, and each must be where the
/// index says.
fn open_index(path: &Path) -> Result<WeightFile, WeightsError> {
    let fail = |m: String| WeightsError::new(path, m);
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        fail("has no `weight_map` object (a sharded checkpoint's index maps tensor names to files)".into())
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = Vec::new();
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| fail(format!("`weight_map.{name}` is not a file name")))?;
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    let mut w = WeightFile::empty(path, Format::Safetensors);
    for f in &files {
        w.add_safetensors(&dir.join(f))?;
    }
    for (name, f) in map {
        let f = f.as_str().unwrap_or_default();
        let want = dir.join(f);
        match w.by_name.get(name) {
            Some(&i) if w.files[w.places[i].file] == want => {}
            Some(&i) => {
                return Err(fail(format!("maps `{name}` to {f} but it is in {}", w.files[w.places[i].file].display())));
            }
            None => return Err(fail(format!("maps `{name}` to {f}, which has no such tensor"))),
        }
    }
    if w.tensors.len() != map.len() {
        let extra: Vec<&str> =
            w.tensors.iter().map(|t| t.name.as_str()).filter(|n| !map.contains_key(*n)).take(5).collect();
        return Err(fail(format!("its files hold tensors the index does not name: {extra:?}")));
    }
    Ok(w)
}

/// Weights read from a file: each parameter's, or `None` where the file's
/// mapping does not name the parameter.
#[derive(Debug)]
pub struct Loaded {
    /// How the file names its tensors: `parameter paths`, or the format of
    /// the spec's mapping that fits it (`hf`, `gguf`).
    pub naming: String,
    pub params: Vec<Option<crate::tensor::Tensor<f32>>>,
}

impl Loaded {
    /// The paths of the parameters the file does not hold.
    pub fn absent<'a>(&self, params: &'a [tessera_compiler::ir::Param]) -> Vec<&'a str> {
        self.params.iter().zip(params).filter(|(t, _)| t.is_none()).map(|(_, p)| p.path.as_str()).collect()
    }

    /// Every parameter's weights, those absent drawn as a fresh run with
    /// `seed` draws them (a new head; LoRA adapters, B = 0).
    pub fn or_fresh(self, params: &[tessera_compiler::ir::Param], seed: u64) -> Vec<crate::tensor::Tensor<f32>> {
        self.params
            .into_iter()
            .enumerate()
            .map(|(k, w)| w.unwrap_or_else(|| crate::init::init_param(&params[k], k, seed)))
            .collect()
    }

    /// Every parameter's weights; one that `from` does not hold is an error naming it.
    pub fn every(
        self,
        params: &[tessera_compiler::ir::Param],
        from: &Path,
    ) -> Result<Vec<crate::tensor::Tensor<f32>>, String> {
        let absent = self.absent(params);
        if !absent.is_empty() {
            return Err(format!("{} does not hold every parameter ({})", from.display(), absent.join(", ")));
        }
        Ok(self.params.into_iter().flatten().collect())
    }
}

/// The weights of model `m` in `path`: a Tessera checkpoint (a run or
/// `step-*` folder; one of the model without its LoRA adapters leaves them
/// absent), or a weights file as [`load`] reads it.
pub fn read(path: &Path, m: &tessera_compiler::Model) -> Result<Loaded, String> {
    use crate::train::checkpoint::{is_checkpoint, load_params};
    if !is_checkpoint(path) {
        return load(path, &m.params, &m.weights).map_err(|e| e.to_string());
    }
    let loaded = |params| Loaded { naming: "a Tessera checkpoint".into(), params };
    match load_params(path, &m.params) {
        Ok(w) => Ok(loaded(w.into_iter().map(Some).collect())),
        // A checkpoint of the model without its LoRA adapters: they are absent.
        Err(e) if m.params.iter().any(|p| p.adapter_of.is_some()) => {
            let base = crate::lora::base_params(m);
            let mut all: Vec<_> = load_params(path, &base).map_err(|_| e.to_string())?.into_iter().map(Some).collect();
            all.resize(m.params.len(), None);
            Ok(loaded(all))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The weights of model `m` in several paths that together hold them,
/// each parameter in one (`--init BASE --init ADAPTERS`); one path reads as
/// [`read`].
pub fn read_parts(paths: &[PathBuf], m: &tessera_compiler::Model) -> Result<Loaded, String> {
    if let [one] = paths {
        return read(one, m);
    }
    let mut parts = Vec::new();
    for p in paths {
        let l = match crate::train::checkpoint::is_checkpoint(p) {
            true => read(p, m)?,
            false => load_part(p, &m.params, &m.weights).map_err(|e| e.to_string())?,
        };
        parts.push((p.clone(), l));
    }
    combine(parts, &m.params).map_err(|e| e.to_string())
}

/// The weights of `params` from the file at `path`. Its tensors are named
/// either by the parameters' paths (as Tessera's checkpoints name them:
/// every parameter must be there), or as one of the spec's `weights`
/// mappings says (the one that names most of the file's tensors; the
/// parameters it does not name are `None`). Every name and shape is
/// checked before anything is read, and nothing is returned half.
pub fn load(
    path: &Path,
    params: &[tessera_compiler::ir::Param],
    maps: &[tessera_compiler::model::WeightMap],
) -> Result<Loaded, WeightsError> {
    load_with(path, params, maps, true)
}

/// [`load`] for one of several files that together hold the weights (a
/// base checkpoint and a LoRA run's `adapters.safetensors`): a file named
/// by parameter paths may hold any of them; [`combine`] checks the whole.
pub fn load_part(
    path: &Path,
    params: &[tessera_compiler::ir::Param],
    maps: &[tessera_compiler::model::WeightMap],
) -> Result<Loaded, WeightsError> {
    load_with(path, params, maps, false)
}

/// The weights of several files, each parameter from the one file that
/// holds it; a parameter two files hold is an error that names both.
pub fn combine(parts: Vec<(PathBuf, Loaded)>, params: &[tessera_compiler::ir::Param]) -> Result<Loaded, WeightsError> {
    let mut out: Vec<Option<crate::tensor::Tensor<f32>>> = vec![None; params.len()];
    let mut from: Vec<Option<&Path>> = vec![None; params.len()];
    let mut naming = Vec::new();
    for (path, l) in &parts {
        naming.push(format!("{} ({})", path.display(), l.naming));
        for (k, t) in l.params.iter().enumerate() {
            let Some(t) = t else { continue };
            if let Some(first) = from[k] {
                return Err(WeightsError::new(
                    path,
                    format!(
                        "it holds `{}`, which {} holds too; pass each parameter in one file",
                        params[k].path,
                        first.display()
                    ),
                ));
            }
            from[k] = Some(path);
            out[k] = Some(t.clone());
        }
    }
    Ok(Loaded { naming: naming.join(" and "), params: out })
}

fn load_with(
    path: &Path,
    params: &[tessera_compiler::ir::Param],
    maps: &[tessera_compiler::model::WeightMap],
    whole: bool,
) -> Result<Loaded, WeightsError> {
    let w = WeightFile::open(path)?;
    if params.iter().any(|p| w.get(&p.path).is_some()) || maps.is_empty() {
        // LoRA adapters the file lacks (the weights of the model without
        // them) are absent: they start as a fresh run draws them. Part of
        // several files, it holds what it holds.
        let held: Vec<usize> = (0..params.len())
            .filter(|&k| (whole && params[k].adapter_of.is_none()) || w.get(&params[k].path).is_some())
            .collect();
        let subset: Vec<tessera_compiler::ir::Param> = held.iter().map(|&k| params[k].clone()).collect();
        let mut all: Vec<Option<crate::tensor::Tensor<f32>>> = vec![None; params.len()];
        for (k, t) in held.into_iter().zip(load_params_from(&w, &subset)?) {
            all[k] = Some(t);
        }
        return Ok(Loaded { naming: "parameter paths".into(), params: all });
    }
    let best = maps.iter().map(|m| (map::fit(m, params, &w), m)).filter(|(n, _)| *n > 0).max_by_key(|(n, _)| *n);
    match best {
        Some((_, m)) => Ok(Loaded { naming: m.format.clone(), params: map::import(&w, m, params)? }),
        None => {
            let names: Vec<&str> = w.tensors().iter().map(|t| t.name.as_str()).collect();
            let formats: Vec<String> = maps.iter().map(|m| format!("`{}`", m.format)).collect();
            Err(WeightsError::new(
                w.path(),
                format!(
                    "its tensors ({}) are named neither by the spec's parameter paths nor as its mappings {} \
                     name them. Is this the model the spec describes? Add a `weights FORMAT for MODEL` mapping \
                     for this checkpoint (docs/inference.md)",
                    map::list(&names),
                    formats.join(", ")
                ),
            ))
        }
    }
}

/// The logical weights of `params` from the weights file at `path`, whose
/// tensors are named by the parameters' paths (as Tessera's checkpoints
/// name them): every parameter must be there with its shape, and every
/// tensor of the file must be a parameter. All of it is checked before
/// anything is read, and nothing is returned half.
pub fn load_params(
    path: &Path,
    params: &[tessera_compiler::ir::Param],
) -> Result<Vec<crate::tensor::Tensor<f32>>, WeightsError> {
    load_params_from(&WeightFile::open(path)?, params)
}

fn load_params_from(
    w: &WeightFile,
    params: &[tessera_compiler::ir::Param],
) -> Result<Vec<crate::tensor::Tensor<f32>>, WeightsError> {
    let fail = |m: String| WeightsError::new(w.path(), m);
    let mut missing = Vec::new();
    for p in params {
        let want: Vec<u64> = p.ty.dims.iter().map(|d| d.size).collect();
        match w.get(&p.path) {
            None => missing.push(p.path.as_str()),
            Some(t) if t.shape != want => {
                return Err(fail(format!(
                    "tensor `{}` is {} {:?}, but the spec's parameter `{}` is {} ({:?})",
                    t.name, t.dtype, t.shape, p.path, p.ty, want
                )));
            }
            Some(_) => {}
        }
    }
    let extra: Vec<&str> =
        w.tensors().iter().map(|t| t.name.as_str()).filter(|n| !params.iter().any(|p| p.path == *n)).collect();
    if !missing.is_empty() || !extra.is_empty() {
        let list = map::list;
        let mut m = String::from("its tensors are not the spec's parameters:");
        if !missing.is_empty() {
            m += &format!(" {} parameter(s) have no tensor ({})", missing.len(), list(&missing));
        }
        if !extra.is_empty() {
            m += &format!(
                "{} {} tensor(s) are no parameter ({})",
                if missing.is_empty() { "" } else { ";" },
                extra.len(),
                list(&extra)
            );
        }
        m += ". The file must name each tensor by the spec's parameter path (`tessera inspect SPEC` lists them), \
              as Tessera's checkpoints do";
        return Err(fail(m));
    }
    let mut out = Vec::with_capacity(params.len());
    for p in params {
        let data = w.read(&p.path)?;
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(fail(format!("tensor `{}` holds a value that is not finite (element {i})", p.path)));
        }
        out.push(crate::tensor::Tensor { dims: p.ty.dims.clone(), data });
    }
    Ok(out)
}

/// Write the tensors `map` names, gathered from the logical weights of
/// `params`, as a Hugging Face checkpoint: `model.safetensors` plus the
/// mapping's `config.json`, into `dir` (created). Each file is written to a
/// temporary name and renamed. Returns the paths of the parameters the
/// mapping does not name (not written).
pub fn export_hf<'a>(
    dir: &Path,
    map: &tessera_compiler::model::WeightMap,
    params: &'a [tessera_compiler::ir::Param],
    weights: &[crate::tensor::Tensor<f32>],
) -> Result<Vec<&'a str>, WeightsError> {
    let fail = |p: &Path, e: &dyn std::fmt::Display| WeightsError::new(p, e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| fail(dir, &e))?;
    let tensors: Vec<(String, crate::tensor::Tensor<f32>)> = map::export(map, params, weights)
        .into_iter()
        .map(|(name, shape, data)| {
            let dims = shape
                .iter()
                .enumerate()
                .map(|(i, &size)| tessera_compiler::model::Dim { name: format!("d{i}"), size })
                .collect();
            (name, crate::tensor::Tensor { dims, data })
        })
        .collect();
    let path = dir.join("model.safetensors");
    let tmp = dir.join(format!(".model.safetensors.tmp-{}", std::process::id()));
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::train::checkpoint::write_tensors(&tmp, tensors.iter().map(|(n, t)| (n.clone(), t)).collect(), meta)
        .map_err(|e| fail(&path, &e))?;
    std::fs::rename(&tmp, &path).map_err(|e| fail(&path, &e))?;
    let mut config = map.config.clone();
    config.entry("torch_dtype").or_insert_with(|| "float32".into());
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(config)).expect("JSON") + "\n";
    let cpath = dir.join("config.json");
    let ctmp = dir.join(format!(".config.json.tmp-{}", std::process::id()));
    std::fs::write(&ctmp, text).map_err(|e| fail(&cpath, &e))?;
    std::fs::rename(&ctmp, &cpath).map_err(|e| fail(&cpath, &e))?;
    let named: Vec<usize> = map.rules.iter().filter_map(|r| r.target.as_ref().map(|t| t.param)).collect();
    Ok(params.iter().enumerate().filter(|(i, _)| !named.contains(i)).map(|(_, p)| p.path.as_str()).collect())
}
