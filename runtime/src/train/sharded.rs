//! Sharded checkpoints, as PyTorch's distributed checkpoint writes them:
//! every rank writes the pieces of the logical tensors it holds into a file
//! of its own (`rank-RRRRR.safetensors`), and `manifest.json` names each
//! logical tensor's pieces: which elements (per dim, the logical indices a
//! piece holds, as ranges; and where ZeRO splits the rank's cut, which
//! stretch of it) and where they are. Rank 0 writes the manifest only after
//! every rank's file is on disk, and renames the folder into place, so a
//! checkpoint is complete or absent.
//!
//! A rank that loads one, under any layout and world size, reads only the
//! pieces that overlap its own cut of each tensor, and of those files only
//! those pieces. A replica's piece (data-parallel copies) is written once,
//! by the lowest rank that holds it. Runs whose ranks are processes write
//! this format; a single process writes one file of logical tensors
//! (`checkpoint.rs`), and both load under any layout.

use super::TrainError;
use super::checkpoint::{self, io};
use super::shards::{holds_flat_shard, maps, state_param, weight_buffer};
use crate::tensor::Tensor;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tessera_compiler::config::{Optimizer, StateRole};
use tessera_compiler::driver::Compiled;
use tessera_compiler::ir::Dim;
use tessera_compiler::lower::{Bound, Program};

pub const MANIFEST: &str = "manifest.json";
const FORMAT: &str = "tessera-sharded-1";

/// Which state of a parameter a logical tensor is: in a manifest, `weight`
/// or the state's prefix (`m`, `v`, `vr`, `vc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The weights (the f32 master weights where the run keeps them).
    Weight,
    /// A tensor of the optimizer's state.
    State(StateRole),
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Weight => "weight",
            Role::State(s) => s.prefix(),
        }
    }
}

impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        let name = String::deserialize(d)?;
        std::iter::once(Role::Weight)
            .chain(StateRole::ALL.iter().map(|&s| Role::State(s)))
            .find(|r| r.name() == name)
            .ok_or_else(|| serde::de::Error::custom(format!("`{name}` is not a role of a parameter's state")))
    }
}

/// Per logical dim, the indices a piece's box holds, as `[start, end)` ranges.
type IndexBox = Vec<Vec<[u64; 2]>>;

/// Some elements of a logical tensor, stored as one 1-D tensor `key` in `file`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Piece {
    pub file: String,
    pub key: String,
    /// Per logical dim, the indices the piece's box holds, as `[start, end)`
    /// ranges in the box's order.
    pub index: IndexBox,
    /// The piece's elements: this stretch of the box's elements in row-major order.
    pub flat: [u64; 2],
}

/// One logical tensor and its pieces.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub path: String,
    pub role: Role,
    pub shape: Vec<u64>,
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The ranks that wrote it.
    pub world: usize,
    pub entries: Vec<Entry>,
}

/// What one rank writes: the piece of entry `entry`, the first elements of
/// its buffer `bound` (its cut, or its ZeRO shard of it).
#[derive(Debug, Clone)]
pub struct Write {
    pub entry: usize,
    pub bound: Bound,
    pub piece: Piece,
}

/// The buffers of parameter `k` that hold its logical state in program `p`:
/// the weights (see [`weight_buffer`]) and, with `moments`, the optimizer
/// state the program keeps.
pub fn state_buffers(p: &Program, k: usize, moments: bool) -> Vec<(Role, Bound)> {
    let mut all = vec![(Role::Weight, weight_buffer(p, k))];
    if moments {
        all.extend(StateRole::ALL.iter().map(|&s| (Role::State(s), Bound::State(k, s))));
    }
    all.retain(|&(_, b)| p.bound(b).is_some());
    all
}

/// The manifest of a checkpoint of `c`'s ranks, and what each rank writes
/// (a pure function of the layout: every process plans the same), with
/// the state of optimizer `opt` where it is given.
pub fn plan(c: &Compiled, opt: Option<&Optimizer>) -> (Manifest, Vec<Vec<Write>>) {
    let mut entries: Vec<Entry> = Vec::new();
    let mut index_of: HashMap<(usize, Role), usize> = HashMap::new();
    // (entry, index, flat) of every piece planned so far.
    let mut seen: HashSet<(usize, IndexBox, [u64; 2])> = HashSet::new();
    let mut writes: Vec<Vec<Write>> = vec![Vec::new(); c.programs.len()];
    let dp = c.mesh.data_group().map(|(_, n)| n).unwrap_or(1) as usize;
    for (r, (p, rp)) in c.programs.iter().zip(&c.ranks).enumerate() {
        for (k, logical) in c.params.iter().enumerate() {
            let whole = &rp.params[k];
            if !whole.held {
                continue;
            }
            for (role, bound) in state_buffers(p, k, opt.is_some()) {
                // The tensor's own dims and cut (an optimizer state may keep fewer dims).
                let (shard, meta) = match (role, opt) {
                    (Role::State(s), Some(o)) => match state_param(o, whole, logical, s) {
                        Some(v) => v,
                        None => continue,
                    },
                    _ => (whole.clone(), logical.clone()),
                };
                let n = shard.local.ty.numel();
                let index = ranges(&maps(&shard, &meta));
                let flat = match holds_flat_shard(&c.mesh, &shard, bound) {
                    true => {
                        let per = n.div_ceil(dp as u64);
                        let start = c.mesh.data_coord(r as u64) * per;
                        [start.min(n), (start + per).min(n)]
                    }
                    false => [0, n],
                };
                if flat[0] >= flat[1] {
                    continue;
                }
                let entry = *index_of.entry((k, role)).or_insert_with(|| {
                    entries.push(Entry {
                        path: meta.path.clone(),
                        role,
                        shape: meta.ty.dims.iter().map(|d| d.size).collect(),
                        pieces: Vec::new(),
                    });
                    entries.len() - 1
                });
                // A replica's piece is written once, by the first rank that holds it.
                if !seen.insert((entry, index.clone(), flat)) {
                    continue;
                }
                let piece = Piece {
                    file: file_of(r),
                    key: format!("{}.{}", role.name(), meta.path),
                    index: index.clone(),
                    flat,
                };
                entries[entry].pieces.push(piece.clone());
                writes[r].push(Write { entry, bound, piece });
            }
        }
    }
    (Manifest { format: FORMAT.into(), world: c.programs.len(), entries }, writes)
}

fn file_of(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// Index lists as `[start, end)` ranges, in order.
fn ranges(maps: &[Vec<u64>]) -> IndexBox {
    maps.iter()
        .map(|m| {
            let mut out: Vec<[u64; 2]> = Vec::new();
            for &i in m {
                match out.last_mut() {
                    Some(r) if r[1] == i => r[1] += 1,
                    _ => out.push([i, i + 1]),
                }
            }
            out
        })
        .collect()
}

fn expand(ranges: &[[u64; 2]]) -> Vec<u64> {
    ranges.iter().flat_map(|r| r[0]..r[1]).collect()
}

/// Write one rank's pieces (`named`: key, elements) to `dir/file`, and flush it to disk.
pub fn write_file(dir: &Path, file: &str, named: &[(String, Tensor<f32>)]) -> Result<(), TrainError> {
    let path = dir.join(file);
    let refs = named.iter().map(|(k, t)| (k.clone(), t)).collect();
    checkpoint::write_tensors(&path, refs, HashMap::new())?;
    std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| io(e, &path))
}

/// Put a checkpoint written into `tmp` (every rank's file, durable) in
/// place as `out/step-N`: the manifest and `state.json`, then the rename,
/// then `latest`.
pub fn commit(
    out: &Path,
    tmp: &Path,
    step: u64,
    manifest: &Manifest,
    state: &serde_json::Value,
) -> Result<PathBuf, TrainError> {
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| io(e, tmp))?;
    std::fs::write(tmp.join(MANIFEST), text).map_err(|e| io(e, tmp))?;
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(state).unwrap_or_default())
        .map_err(|e| io(e, tmp))?;
    checkpoint::sync_dir(tmp);
    let name = format!("step-{step:08}");
    let dest = out.join(&name);
    checkpoint::replace_dir(tmp, &dest)?;
    checkpoint::write_atomic(&out.join("latest"), name.as_bytes())?;
    checkpoint::sync_dir(out);
    Ok(dest)
}

/// Whether checkpoint folder `dir` (a `step-*` folder) is sharded.
pub fn is_sharded(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// The manifest of a sharded checkpoint folder.
pub fn manifest(dir: &Path) -> Result<Manifest, TrainError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| io(e, &path))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| {
        TrainError::Io(format!("`{}` is not a manifest ({e}); the checkpoint is damaged", path.display()))
    })?;
    if m.format != FORMAT {
        return Err(TrainError::Io(format!(
            "`{}` is format `{}`; this tessera reads `{FORMAT}`",
            path.display(),
            m.format
        )));
    }
    Ok(m)
}

/// What a load read: pieces and bytes, of how many pieces in the manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reads {
    pub pieces: usize,
    pub bytes: u64,
    pub of: usize,
}

/// A sharded checkpoint open for reading.
pub struct Reader {
    pub dir: PathBuf,
    pub manifest: Manifest,
    by_name: HashMap<(String, Role), usize>,
    /// Each file's parsed header, read once.
    headers: HashMap<String, (u64, serde_json::Value)>,
    pub reads: Reads,
}

impl Reader {
    pub fn open(dir: &Path) -> Result<Reader, TrainError> {
        let manifest = manifest(dir)?;
        let by_name = manifest.entries.iter().enumerate().map(|(i, e)| ((e.path.clone(), e.role), i)).collect();
        let of = manifest.entries.iter().map(|e| e.pieces.len()).sum();
        Ok(Reader {
            dir: dir.to_path_buf(),
            manifest,
            by_name,
            headers: HashMap::new(),
            reads: Reads { of, ..Reads::default() },
        })
    }

    /// Whether the checkpoint holds `role` of `path` (the optimizer's moments may be absent).
    pub fn has(&self, path: &str, role: Role) -> bool {
        self.by_name.contains_key(&(path.to_string(), role))
    }

    /// The elements of `role` of parameter `path` (logical dims `dims`)
    /// that a cut holds: per dim, the logical indices, in the cut's order.
    /// Reads only the pieces that overlap the cut.
    pub fn cut(&mut self, path: &str, role: Role, dims: &[Dim], target: &[Vec<u64>]) -> Result<Vec<f32>, TrainError> {
        let Some(&e) = self.by_name.get(&(path.to_string(), role)) else {
            return Err(TrainError::Setup(format!(
                "the sharded checkpoint `{}` has no {} of `{path}`: was it written by another spec?",
                self.dir.display(),
                role.name()
            )));
        };
        let entry = self.manifest.entries[e].clone();
        let shape: Vec<u64> = dims.iter().map(|d| d.size).collect();
        if entry.shape != shape {
            return Err(TrainError::Setup(format!(
                "checkpoint tensor `{path}` is {:?} in `{}`, the spec says {:?}",
                entry.shape,
                self.dir.display(),
                shape
            )));
        }
        // Where each logical index sits in the cut, per dim.
        let pos: Vec<Vec<Option<usize>>> = target
            .iter()
            .zip(&shape)
            .map(|(m, &size)| {
                let mut p = vec![None; size as usize];
                for (at, &i) in m.iter().enumerate() {
                    if let Some(slot) = p.get_mut(i as usize) {
                        *slot = Some(at);
                    }
                }
                p
            })
            .collect();
        let lens: Vec<usize> = target.iter().map(Vec::len).collect();
        let mut strides = vec![1usize; lens.len()];
        for i in (0..lens.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * lens[i + 1];
        }
        let total: usize = lens.iter().product();
        let mut out = vec![0f32; total];
        let mut filled = vec![false; total];
        for piece in &entry.pieces {
            let idx: Vec<Vec<u64>> = piece.index.iter().map(|r| expand(r)).collect();
            if idx.len() != pos.len() {
                return Err(TrainError::Io(format!(
                    "a piece of `{path}` has {} dims, the tensor {}",
                    idx.len(),
                    pos.len()
                )));
            }
            // Read only pieces that hold some element of the cut.
            let overlaps =
                idx.iter().zip(&pos).all(|(ix, p)| ix.iter().any(|&i| p.get(i as usize).is_some_and(Option::is_some)));
            if !overlaps {
                continue;
            }
            let data = self.piece(piece)?;
            let box_lens: Vec<usize> = idx.iter().map(Vec::len).collect();
            let n = (piece.flat[1] - piece.flat[0]) as usize;
            if data.len() != n {
                return Err(TrainError::Io(format!(
                    "piece `{}` of `{}` holds {} values, its manifest says {n}",
                    piece.key,
                    piece.file,
                    data.len()
                )));
            }
            let mut coord = vec![0usize; box_lens.len()];
            // The box coordinates of the piece's first element.
            let mut rest = piece.flat[0] as usize;
            for i in (0..box_lens.len()).rev() {
                coord[i] = rest % box_lens[i].max(1);
                rest /= box_lens[i].max(1);
            }
            for &v in &data {
                let mut at = 0;
                let mut inside = true;
                for i in 0..coord.len() {
                    match pos[i][idx[i][coord[i]] as usize] {
                        Some(p) => at += p * strides[i],
                        None => {
                            inside = false;
                            break;
                        }
                    }
                }
                if inside {
                    out[at] = v;
                    filled[at] = true;
                }
                for i in (0..coord.len()).rev() {
                    coord[i] += 1;
                    if coord[i] < box_lens[i] {
                        break;
                    }
                    coord[i] = 0;
                }
            }
        }
        if let Some(missing) = filled.iter().position(|f| !f) {
            return Err(TrainError::Io(format!(
                "the sharded checkpoint `{}` does not hold element {missing} of this rank's cut of `{path}` ({}): \
                 a rank's file is missing from its manifest",
                self.dir.display(),
                role.name()
            )));
        }
        if out.iter().any(|x| !x.is_finite()) {
            return Err(TrainError::Setup(format!(
                "checkpoint tensor `{path}` ({}) in `{}` holds non-finite values (NaN or infinity); the run that \
                 wrote it had diverged. Resume from an older `step-*` folder",
                role.name(),
                self.dir.display()
            )));
        }
        Ok(out)
    }

    /// The whole logical tensor `role` of `path`.
    pub fn logical(&mut self, path: &str, role: Role, dims: &[Dim]) -> Result<Tensor<f32>, TrainError> {
        let all: Vec<Vec<u64>> = dims.iter().map(|d| (0..d.size).collect()).collect();
        Ok(Tensor { dims: dims.to_vec(), data: self.cut(path, role, dims, &all)? })
    }

    /// One piece's elements, read from its file alone and checked against its checksum.
    fn piece(&mut self, piece: &Piece) -> Result<Vec<f32>, TrainError> {
        let path = self.dir.join(&piece.file);
        if !self.headers.contains_key(&piece.file) {
            let header = read_header(&path)?;
            self.headers.insert(piece.file.clone(), header);
        }
        let (data_start, header) = &self.headers[&piece.file];
        let info = &header[&piece.key];
        let offsets = info["data_offsets"].as_array().filter(|o| o.len() == 2);
        let (Some(offsets), Some("F32")) = (offsets, info["dtype"].as_str()) else {
            return Err(TrainError::Io(format!("`{}` has no f32 piece `{}`", path.display(), piece.key)));
        };
        let (s, e) = (offsets[0].as_u64().unwrap_or(0), offsets[1].as_u64().unwrap_or(0));
        let mut f = std::fs::File::open(&path).map_err(|e| io(e, &path))?;
        f.seek(SeekFrom::Start(data_start + s)).map_err(|e| io(e, &path))?;
        let mut bytes = vec![0u8; e.saturating_sub(s) as usize];
        f.read_exact(&mut bytes).map_err(|e| io(e, &path))?;
        let crcs: HashMap<String, String> = header["__metadata__"][checkpoint::TENSOR_CRC]
            .as_str()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        if crcs.get(&piece.key).map(String::as_str) != Some(format!("{:08x}", crc32fast::hash(&bytes)).as_str()) {
            return Err(TrainError::Io(format!(
                "checkpoint piece `{}` in `{}` fails its checksum: its bytes changed after it was written. Resume \
                 from an older `step-*` folder",
                piece.key,
                path.display()
            )));
        }
        self.reads.pieces += 1;
        self.reads.bytes += bytes.len() as u64;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// A safetensors file's header: where its data starts, and the header itself.
fn read_header(path: &Path) -> Result<(u64, serde_json::Value), TrainError> {
    let missing = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => TrainError::Io(format!(
            "checkpoint file `{}` is missing; the checkpoint is incomplete, pass an intact `step-*` folder",
            path.display()
        )),
        _ => io(e, path),
    };
    let mut f = std::fs::File::open(path).map_err(missing)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| io(e, path))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(TrainError::Io(format!("`{}` is damaged: a header of {n} bytes", path.display())));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| io(e, path))?;
    let v = serde_json::from_slice(&header)
        .map_err(|e| TrainError::Io(format!("`{}` is damaged: its header is not JSON ({e})", path.display())))?;
    Ok((8 + n, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_lists_become_ranges_in_order() {
        assert_eq!(ranges(&[vec![0, 1, 2, 5, 6, 3]]), vec![vec![[0, 3], [5, 7], [3, 4]]]);
        assert_eq!(expand(&[[0, 3], [5, 7], [3, 4]]), vec![0, 1, 2, 5, 6, 3]);
    }
}
