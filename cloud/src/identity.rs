//! The identity index: every enrolled face template's embedding in FAISS, keyed by a stable
//! template id, searched by inner product (cosine, since embeddings are L2-normalised).
//!
//! The index is a cache of the store of record: it is persisted to a file for fast starts, and
//! rebuilt from the store of record whenever that file is missing, unreadable, disagrees with
//! the store about how many templates there are, or was saved after the store's latest change;
//! the change log is replayed from the version it was saved at.

use std::{collections::HashSet, path::Path, sync::Mutex};

use faiss::{
    index::{
        autotune::ParameterSpace,
        flat::FlatIndexImpl,
        ivf_flat::IVFFlatIndexImpl,
        scalar_quantizer::{IVFScalarQuantizerIndexImpl, QuantizerType},
        IndexImpl,
    },
    index_factory, ConcurrentIndex, Idx, Index, MetricType,
};
use serde::{Deserialize, Serialize};
use storage::Sealer;

/// Embedding dimension of SFace.
pub const EMBEDDING_DIM: u32 = 128;
/// Points a product quantiser's codebooks train on: FAISS uses at most 256 per centroid, and a
/// 4-bit sub-quantiser has 16 (more would only be sampled away).
const PQ_TRAINING_POINTS: usize = 16 * 256;
/// IVF needs about this many training points per list for stable centroids (FAISS's own advice).
const IVF_POINTS_PER_LIST: usize = 39;

/// Which FAISS index to use; the `[identity] index` configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum IndexKind {
    /// Exact search over every template: small fleets, and the reference for recall.
    Flat,
    /// Inverted lists: `nlist` clusters, `nprobe` of them searched per query. Supports removal.
    Ivf {
        /// Number of clusters (fewer are used while the index holds few templates).
        nlist: usize,
        /// Clusters searched per query.
        nprobe: usize,
    },
    /// Inverted lists over 8-bit codes (a quarter of the memory of `ivf`, and scanned faster, so
    /// many more lists can be searched per query). Never written to disk: built again at each
    /// start.
    IvfSq8 {
        /// Number of clusters (fewer are used while the index holds few templates).
        nlist: usize,
        /// Clusters searched per query.
        nprobe: usize,
    },
    /// HNSW graph with `m` links per node. Cannot remove: erasure rebuilds it. Searched by one
    /// thread at a time.
    Hnsw {
        /// Links per node.
        m: usize,
        /// Candidate list size at search time.
        ef_search: usize,
    },
    /// Every template scanned as a 4-bit product-quantised code (`m` codes of 4 bits, FAISS's
    /// SIMD "fast scan"), the best `k * k_factor` re-ranked by their exact vectors. Cannot
    /// remove: erasure rebuilds it. Searched by one thread at a time.
    PqRefine {
        /// Sub-quantisers (128 must divide by it).
        m: usize,
        /// How many more candidates than asked for are re-ranked exactly.
        k_factor: usize,
    },
}

impl IndexKind {
    /// How many lists an IVF of `templates` templates is trained with: the configured number,
    /// fewer while there are too few templates to train them. Exact search is one list.
    fn lists_for(self, templates: usize) -> Option<usize> {
        match self {
            IndexKind::Flat => Some(1),
            IndexKind::Ivf { nlist, .. } | IndexKind::IvfSq8 { nlist, .. } => {
                Some(nlist.min(templates / IVF_POINTS_PER_LIST).max(1))
            }
            IndexKind::Hnsw { .. } | IndexKind::PqRefine { .. } => None,
        }
    }
}

/// What went wrong in the identity index.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// FAISS refused an operation.
    #[error("faiss: {0}")]
    Faiss(#[from] faiss::error::Error),
    /// A vector of the wrong length.
    #[error("embedding has {got} values, expected {expected}")]
    Dimension {
        /// Length given.
        got: usize,
        /// Length expected.
        expected: u32,
    },
    /// The index file could not be written.
    #[error("identity index file: {0}")]
    Io(String),
    /// HNSW and product-quantised indexes cannot delete; the caller rebuilds instead.
    #[error("this index type cannot remove templates; rebuild it without them")]
    RemoveUnsupported,
}

/// A search hit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Template id.
    pub template_id: u64,
    /// Cosine similarity.
    pub score: f32,
}

/// The FAISS structure behind an index.
enum Faiss {
    /// Inverted lists over flat vectors, ids stored in the lists. Exact search is one list
    /// searched whole. FAISS searches these from any number of threads at once.
    Ivf(IVFFlatIndexImpl),
    /// Inverted lists over 8-bit codes of the vectors themselves (not residuals); searched from
    /// any number of threads at once too.
    IvfSq8(IVFScalarQuantizerIndexImpl<FlatIndexImpl>),
    /// An HNSW graph or a re-ranked product quantiser behind an id map, built by FAISS's index
    /// factory: the FAISS crate offers no shared search for these, one thread searches at a
    /// time.
    Serial(Mutex<IndexImpl>),
}

/// The FAISS index and what it is. Searches take `&self`: many threads search one index at once
/// (behind a read lock), while changes take `&mut self`.
pub struct IdentityIndex {
    faiss: Faiss,
    kind: IndexKind,
    /// How many templates it was trained on (or held when read back).
    trained_on: usize,
    /// The template ids held, kept for the kinds that cannot remove (HNSW, product codes): a
    /// change that removes none of them needs no rebuild.
    held: Option<HashSet<u64>>,
    /// The customer store's change-log version its file was saved at (read back only).
    file_version: Option<u64>,
}

fn check_dim(v: &[f32]) -> Result<(), IdentityError> {
    if v.len() != EMBEDDING_DIM as usize {
        return Err(IdentityError::Dimension {
            got: v.len(),
            expected: EMBEDDING_DIM,
        });
    }
    Ok(())
}

impl IdentityIndex {
    /// Builds an index of `kind` holding `templates` (id, embedding). IVF is trained on them,
    /// with fewer lists while there are too few templates to train the configured number.
    pub fn build(kind: IndexKind, templates: &[(u64, Vec<f32>)]) -> Result<Self, IdentityError> {
        for (_, v) in templates {
            check_dim(v)?;
        }
        let flat: Vec<f32> = templates
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        let ids: Vec<Idx> = templates.iter().map(|(id, _)| Idx::new(*id)).collect();
        let faiss = match kind.lists_for(templates.len()) {
            Some(lists) if matches!(kind, IndexKind::IvfSq8 { .. }) => {
                let mut ivf = IVFScalarQuantizerIndexImpl::new_with_metric(
                    FlatIndexImpl::new_ip(EMBEDDING_DIM)?,
                    EMBEDDING_DIM,
                    QuantizerType::QT_8bit,
                    lists as u32,
                    MetricType::InnerProduct,
                    Some(false),
                )?;
                ivf.train(&sq8_training_set(&flat, lists))?;
                Faiss::IvfSq8(ivf)
            }
            Some(lists) => {
                let mut ivf = index_factory(
                    EMBEDDING_DIM,
                    format!("IVF{lists},Flat"),
                    MetricType::InnerProduct,
                )?
                .into_ivf_flat()?;
                if lists == 1 {
                    // One list: every vector lands in it whatever its centroid. (As many points
                    // as FAISS asks for per list, or it warns on stderr.)
                    let mut any = vec![0.0; EMBEDDING_DIM as usize * IVF_POINTS_PER_LIST];
                    any.iter_mut()
                        .step_by(EMBEDDING_DIM as usize)
                        .for_each(|v| *v = 1.0);
                    ivf.train(&any)?;
                } else {
                    ivf.train(&flat)?;
                }
                Faiss::Ivf(ivf)
            }
            None => {
                let description = match kind {
                    IndexKind::Hnsw { m, .. } => format!("IDMap,HNSW{m}"),
                    IndexKind::PqRefine { m, .. } => format!("IDMap,PQ{m}x4fs,RFlat"),
                    _ => unreachable!("only HNSW and PQ have no lists"),
                };
                let mut index =
                    index_factory(EMBEDDING_DIM, description, MetricType::InnerProduct)?;
                if let IndexKind::PqRefine { .. } = kind {
                    index.train(&pq_training_set(&flat))?;
                }
                Faiss::Serial(Mutex::new(index))
            }
        };
        let mut built = IdentityIndex {
            faiss,
            kind,
            trained_on: templates.len(),
            held: matches!(kind, IndexKind::Hnsw { .. } | IndexKind::PqRefine { .. })
                .then(HashSet::new),
            file_version: None,
        };
        if !templates.is_empty() {
            built.add_many(&flat, &ids)?;
        }
        built.apply_search_parameters()?;
        Ok(built)
    }

    fn add_many(&mut self, flat: &[f32], ids: &[Idx]) -> Result<(), IdentityError> {
        match &mut self.faiss {
            Faiss::Ivf(ivf) => ivf.add_with_ids(flat, ids)?,
            Faiss::IvfSq8(ivf) => ivf.add_with_ids(flat, ids)?,
            Faiss::Serial(index) => index
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .add_with_ids(flat, ids)?,
        }
        // Counted once FAISS holds them.
        if let Some(held) = &mut self.held {
            held.extend(ids.iter().filter_map(|id| id.get()));
        }
        Ok(())
    }

    fn apply_search_parameters(&mut self) -> Result<(), IdentityError> {
        match (&mut self.faiss, self.kind) {
            (Faiss::Ivf(ivf), IndexKind::Ivf { nprobe, .. }) => ivf.set_nprobe(nprobe as u32),
            (Faiss::Ivf(ivf), IndexKind::Flat) => ivf.set_nprobe(ivf.nlist()),
            (Faiss::IvfSq8(ivf), IndexKind::IvfSq8 { nprobe, .. }) => ivf.set_nprobe(nprobe as u32),
            (Faiss::Serial(graph), IndexKind::Hnsw { ef_search, .. }) => {
                let graph = graph.get_mut().unwrap_or_else(|p| p.into_inner());
                ParameterSpace::new()?.set_index_parameter(&*graph, "efSearch", ef_search as f64)?
            }
            (Faiss::Serial(index), IndexKind::PqRefine { k_factor, .. }) => {
                let index = index.get_mut().unwrap_or_else(|p| p.into_inner());
                ParameterSpace::new()?.set_index_parameter(
                    &*index,
                    "k_factor_rf",
                    k_factor as f64,
                )?
            }
            _ => return Err(IdentityError::Faiss(faiss::error::Error::BadCast)),
        }
        Ok(())
    }

    /// Number of templates held.
    pub fn len(&self) -> u64 {
        index_len(&self.faiss)
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this index was trained for far fewer templates than it now holds (an IVF built
    /// while the fleet was small: searching it costs more and more; a product quantiser trained
    /// on a handful: it ranks worse and worse) until it is built again.
    pub fn outgrown(&self) -> bool {
        let lists = match &self.faiss {
            Faiss::Ivf(ivf) => ivf.nlist(),
            Faiss::IvfSq8(ivf) => ivf.nlist(),
            Faiss::Serial(_) if matches!(self.kind, IndexKind::PqRefine { .. }) => {
                let enough = PQ_TRAINING_POINTS;
                return self.trained_on < enough
                    && self.len() as usize >= 4 * self.trained_on.max(1);
            }
            Faiss::Serial(_) => return false,
        };
        let wanted = self.kind.lists_for(self.len() as usize).unwrap_or(1);
        (lists as usize) * 4 <= wanted
    }

    /// Adds one template.
    pub fn add(&mut self, template_id: u64, embedding: &[f32]) -> Result<(), IdentityError> {
        check_dim(embedding)?;
        self.add_many(embedding, &[Idx::new(template_id)])
    }

    /// The change-log version its file was saved at, for an index read back from one.
    pub fn file_version(&self) -> Option<u64> {
        self.file_version
    }

    /// Whether this kind cannot remove templates (HNSW, product codes): a removal of one it
    /// holds means a rebuild.
    pub fn cannot_remove(&self) -> bool {
        self.held.is_some()
    }

    /// Whether the index holds template `id`, for the kinds that cannot remove (`None` for the
    /// others: they remove and add again instead).
    pub fn holds(&self, id: u64) -> Option<bool> {
        self.held.as_ref().map(|held| held.contains(&id))
    }

    /// Removes templates; returns how many were removed. The kinds that cannot remove answer
    /// [`IdentityError::RemoveUnsupported`] when they hold one of them (0 when they hold none).
    pub fn remove(&mut self, template_ids: &[u64]) -> Result<usize, IdentityError> {
        if let Some(held) = &self.held {
            if !template_ids.iter().any(|id| held.contains(id)) {
                return Ok(0);
            }
        }
        let ids: Vec<Idx> = template_ids.iter().map(|id| Idx::new(*id)).collect();
        let selector = faiss::selector::IdSelector::batch(&ids)?;
        match &mut self.faiss {
            Faiss::Ivf(ivf) => Ok(ivf.remove_ids(&selector)?),
            Faiss::IvfSq8(ivf) => Ok(ivf.remove_ids(&selector)?),
            Faiss::Serial(_) => Err(IdentityError::RemoveUnsupported),
        }
    }

    /// The `k` most similar templates, best first. Any number of threads may search at once.
    pub fn search(&self, embedding: &[f32], k: usize) -> Result<Vec<Hit>, IdentityError> {
        check_dim(embedding)?;
        let result = match &self.faiss {
            Faiss::Ivf(ivf) => ConcurrentIndex::search(ivf, embedding, k)?,
            Faiss::IvfSq8(ivf) => ConcurrentIndex::search(ivf, embedding, k)?,
            Faiss::Serial(index) => index
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .search(embedding, k)?,
        };
        Ok(result
            .labels
            .iter()
            .zip(result.distances)
            .filter_map(|(label, score)| label.get().map(|template_id| Hit { template_id, score }))
            .collect())
    }

    /// Writes the index to a file, sealed: the embeddings are templates, personal data that
    /// never rests on disk in clear. FAISS only writes to files, so it writes into a private file
    /// on a memory file system (`/dev/shm` where there is one), which is read back, sealed and
    /// removed; the sealed file replaces the old one by a rename, so a crash never leaves half an
    /// index behind. The index kind is sealed with it: a file of another kind does not open.
    /// `version` is the customer store's change-log version the index holds every change up to
    /// (it may hold later ones too): whoever opens the file replays the log from there.
    pub fn save(&self, path: &Path, sealer: &Sealer, version: u64) -> Result<(), IdentityError> {
        let io = |e: std::io::Error| IdentityError::Io(format!("{}: {e}", path.display()));
        if matches!(self.faiss, Faiss::IvfSq8(_)) {
            // Never read back (see `load`): nothing is written, and an older file goes.
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
                _ => Ok(()),
            };
        }
        let scratch = scratch_file().map_err(io)?;
        let scratch_path = scratch.path().to_string_lossy().into_owned();
        match &self.faiss {
            Faiss::Ivf(ivf) => faiss::write_index(ivf, &scratch_path)?,
            Faiss::IvfSq8(_) => unreachable!("not written"),
            Faiss::Serial(index) => faiss::write_index(
                &*index.lock().unwrap_or_else(|p| p.into_inner()),
                &scratch_path,
            )?,
        }
        let mut plain = version.to_le_bytes().to_vec();
        if let Some(held) = &self.held {
            // Before FAISS's bytes: what it was trained on, and the ids it holds.
            plain.extend_from_slice(&(self.trained_on as u64).to_le_bytes());
            plain.extend_from_slice(&(held.len() as u64).to_le_bytes());
            for id in held {
                plain.extend_from_slice(&id.to_le_bytes());
            }
        }
        plain.extend(std::fs::read(scratch.path()).map_err(io)?);
        drop(scratch);
        let sealed = sealer.seal(&record_key(self.kind), &plain);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, sealed).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    fn load(path: &Path, kind: IndexKind, sealer: &Sealer) -> Option<Self> {
        let sealed = std::fs::read(path).ok()?;
        let plain = sealer.open(&record_key(kind), &sealed).ok()?;
        let version = u64::from_le_bytes(plain.get(..8)?.try_into().ok()?);
        let plain = &plain[8..];
        let tracks_ids = matches!(kind, IndexKind::Hnsw { .. } | IndexKind::PqRefine { .. });
        let (header, faiss_bytes) = if tracks_ids {
            let (trained_on, held, rest) = split_header(plain)?;
            (Some((trained_on, held)), rest)
        } else {
            (None, plain)
        };
        let scratch = scratch_file().ok()?;
        std::fs::write(scratch.path(), faiss_bytes).ok()?;
        let index = faiss::read_index(scratch.path().to_string_lossy().as_ref()).ok()?;
        let faiss = match kind {
            IndexKind::Flat | IndexKind::Ivf { .. } => Faiss::Ivf(index.into_ivf_flat().ok()?),
            // FAISS reads it back with a quantizer of no known type, which the crate cannot
            // search from several threads: built again instead.
            IndexKind::IvfSq8 { .. } => return None,
            IndexKind::Hnsw { .. } | IndexKind::PqRefine { .. } => Faiss::Serial(Mutex::new(index)),
        };
        let (trained_on, held) = match header {
            Some((trained_on, held)) => (trained_on, Some(held)),
            None => (index_len(&faiss) as usize, None),
        };
        if held
            .as_ref()
            .is_some_and(|h| h.len() as u64 != index_len(&faiss))
        {
            return None;
        }
        let mut loaded = IdentityIndex {
            faiss,
            kind,
            trained_on,
            held,
            file_version: Some(version),
        };
        loaded.apply_search_parameters().ok()?;
        Some(loaded)
    }

    /// Opens the persisted index when it opens with `sealer`, is of `kind`, holds exactly
    /// `expected` templates and was saved at a change-log version no later than `version` (the
    /// store's latest: a later one means the store was restored from an older state); otherwise
    /// rebuilds it from `templates` (the store of record, read after `version` was) and persists
    /// the rebuild. Returns the index and whether it was rebuilt; a reused one tells the version
    /// to replay the change log from ([`IdentityIndex::file_version`]).
    pub fn open_or_rebuild<F>(
        path: &Path,
        kind: IndexKind,
        expected: u64,
        version: u64,
        sealer: &Sealer,
        templates: F,
    ) -> Result<(Self, bool), IdentityError>
    where
        F: FnOnce() -> Vec<(u64, Vec<f32>)>,
    {
        if let Some(opened) = Self::load(path, kind, sealer) {
            if opened.len() == expected
                && !opened.outgrown()
                && opened.file_version.is_some_and(|saved| saved <= version)
            {
                return Ok((opened, false));
            }
            tracing::warn!(path = %path.display(), held = opened.len(), expected, "identity index is stale or outgrown; rebuilding");
        } else if path.exists() {
            tracing::warn!(path = %path.display(), "identity index is unreadable, of another kind, or sealed with another key; rebuilding");
        }
        let rebuilt = IdentityIndex::build(kind, &templates())?;
        rebuilt.save(path, sealer, version)?;
        Ok((rebuilt, true))
    }
}

/// What a sealed file of a kind that cannot remove holds before FAISS's bytes: the number of
/// templates it was trained on, the ids it holds, and the rest (`None`: too short for them).
fn split_header(plain: &[u8]) -> Option<(usize, HashSet<u64>, &[u8])> {
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(plain.get(at..at + 8)?.try_into().ok()?))
    };
    let trained_on = usize::try_from(word(0)?).ok()?;
    let count = usize::try_from(word(8)?).ok()?;
    let end = count.checked_mul(8)?.checked_add(16)?;
    let ids = plain.get(16..end)?;
    let held = ids
        .chunks_exact(8)
        .map(|id| u64::from_le_bytes(id.try_into().expect("8 bytes")))
        .collect();
    Some((trained_on, held, &plain[end..]))
}

fn index_len(faiss: &Faiss) -> u64 {
    match faiss {
        Faiss::Ivf(ivf) => ivf.ntotal(),
        Faiss::IvfSq8(ivf) => ivf.ntotal(),
        Faiss::Serial(index) => index.lock().unwrap_or_else(|p| p.into_inner()).ntotal(),
    }
}

/// What a product quantiser's codebooks (16 centroids per sub-quantiser) train on: a sample of
/// the templates spread over all of them; while there are too few, they are topped up with
/// random unit vectors (`protocol::synthetic`, a fixed seed), which spread the centroids over the sphere
/// the templates live on (the index is trained again on real ones as it grows: `outgrown`).
fn pq_training_set(flat: &[f32]) -> Vec<f32> {
    let dim = EMBEDDING_DIM as usize;
    let wanted = PQ_TRAINING_POINTS;
    let have = flat.len() / dim;
    let mut set: Vec<f32> = if have > wanted {
        // Templates spread over all of them: FAISS would sample no more.
        (0..wanted)
            .flat_map(|i| &flat[(i * have / wanted) * dim..][..dim])
            .copied()
            .collect()
    } else {
        flat.to_vec()
    };
    // Unit vectors uniform on the sphere, the same sequence every time.
    let mut rng = protocol::synthetic::Rng::new(PQ_TRAINING_POINTS as u64);
    while set.len() < wanted * dim {
        set.extend(protocol::synthetic::template(&mut rng));
    }
    set
}

/// What an 8-bit IVF trains on: the templates (the codes' range per dimension comes from them);
/// while there are fewer than FAISS asks for per list, the whole range a component of a unit
/// vector can take with them, repeated (the index is trained again on real ones as it grows).
fn sq8_training_set(flat: &[f32], lists: usize) -> Vec<f32> {
    let wanted = lists * IVF_POINTS_PER_LIST * EMBEDDING_DIM as usize;
    if flat.len() >= wanted {
        return flat.to_vec();
    }
    // The whole range always: a few templates' own ranges would clip the next ones.
    let mut source: Vec<f32> = [-1.0f32, 1.0]
        .iter()
        .flat_map(|v| std::iter::repeat_n(*v, EMBEDDING_DIM as usize))
        .collect();
    source.extend_from_slice(flat);
    source.iter().copied().cycle().take(wanted).collect()
}

/// Associated data of a sealed index file: what it is and its structure (search-time
/// parameters, `nprobe`, `ef_search` and `k_factor`, are applied at each opening and may change freely).
fn record_key(kind: IndexKind) -> Vec<u8> {
    let structure = match kind {
        IndexKind::Flat => "flat".to_string(),
        IndexKind::Ivf { nlist, .. } => format!("ivf:{nlist}"),
        IndexKind::IvfSq8 { nlist, .. } => format!("ivf_sq8:{nlist}"),
        // With the ids held and the training count before FAISS's bytes (files without them are
        // of another structure and rebuilt).
        IndexKind::Hnsw { m, .. } => format!("hnsw:{m}:ids"),
        IndexKind::PqRefine { m, .. } => format!("pq_refine:{m}:ids"),
    };
    [INDEX_RECORD_KEY, b":", structure.as_bytes()].concat()
}

/// Associated data of the sealed index file.
/// (`-2`: the change-log version first; files without it are rebuilt.)
const INDEX_RECORD_KEY: &[u8] = b"facepay-identity-index-2";

/// A private (0600) scratch file in memory where the system has `/dev/shm`, removed on drop.
fn scratch_file() -> std::io::Result<tempfile::NamedTempFile> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(file) = tempfile::Builder::new()
            .prefix(".facepay-")
            .tempfile_in(shm)
        {
            return Ok(file);
        }
    }
    tempfile::Builder::new().prefix(".facepay-").tempfile()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random unit vectors (xorshift), so tests need no extra dependency.
    fn unit_vectors(n: usize, seed: u64) -> Vec<(u64, Vec<f32>)> {
        let mut state = seed.max(1);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 20_000) as f32 / 10_000.0 - 1.0
        };
        (0..n)
            .map(|i| {
                let v: Vec<f32> = (0..EMBEDDING_DIM).map(|_| next()).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                (1000 + i as u64, v.into_iter().map(|x| x / norm).collect())
            })
            .collect()
    }

    #[test]
    fn flat_finds_each_template_and_removes() {
        let data = unit_vectors(200, 7);
        let mut index = IdentityIndex::build(IndexKind::Flat, &data).unwrap();
        assert_eq!(index.len(), 200);
        let hits = index.search(&data[17].1, 2).unwrap();
        assert_eq!(hits[0].template_id, 1017);
        assert!((hits[0].score - 1.0).abs() < 1e-4);
        assert!(hits[1].score < hits[0].score);
        assert_eq!(index.remove(&[1017]).unwrap(), 1);
        assert_ne!(index.search(&data[17].1, 1).unwrap()[0].template_id, 1017);
        assert!(matches!(
            index.search(&[0.0; 3], 1),
            Err(IdentityError::Dimension { got: 3, .. })
        ));
    }

    #[test]
    fn ivf_and_hnsw_recall_against_exact_search() {
        let data = unit_vectors(2_000, 11);
        // Queries: noisy copies of stored templates, as a second photo of an enrolled face is.
        let queries: Vec<(u64, Vec<f32>)> = unit_vectors(100, 99)
            .into_iter()
            .zip(data.iter().step_by(20))
            .map(|((_, noise), (id, v))| {
                let q: Vec<f32> = v.iter().zip(&noise).map(|(a, b)| a + 0.3 * b).collect();
                let n = q.iter().map(|x| x * x).sum::<f32>().sqrt();
                (*id, q.into_iter().map(|x| x / n).collect())
            })
            .collect();
        let exact = IdentityIndex::build(IndexKind::Flat, &data).unwrap();
        for kind in [
            IndexKind::Ivf {
                nlist: 32,
                nprobe: 8,
            },
            IndexKind::Hnsw {
                m: 32,
                ef_search: 64,
            },
            IndexKind::PqRefine {
                m: 32,
                k_factor: 16,
            },
        ] {
            let approx = IdentityIndex::build(kind, &data).unwrap();
            let agree = queries
                .iter()
                .filter(|(_, q)| {
                    exact.search(q, 1).unwrap()[0].template_id
                        == approx.search(q, 1).unwrap()[0].template_id
                })
                .count();
            assert!(agree >= 95, "{kind:?}: recall@1 {agree}/100");
        }
        let mut hnsw = IdentityIndex::build(
            IndexKind::Hnsw {
                m: 16,
                ef_search: 32,
            },
            &data[..10],
        )
        .unwrap();
        assert!(matches!(
            hnsw.remove(&[1000]),
            Err(IdentityError::RemoveUnsupported)
        ));
        let mut ivf = IdentityIndex::build(
            IndexKind::Ivf {
                nlist: 32,
                nprobe: 8,
            },
            &data,
        )
        .unwrap();
        assert_eq!(ivf.remove(&[1000, 1001]).unwrap(), 2);
        assert_eq!(ivf.len(), 1_998);
        hnsw.add(5, &data[20].1).unwrap();
        assert_eq!(hnsw.search(&data[20].1, 1).unwrap()[0].template_id, 5);
        let mut pq =
            IdentityIndex::build(IndexKind::PqRefine { m: 16, k_factor: 4 }, &data[..10]).unwrap();
        assert!(matches!(
            pq.remove(&[1000]),
            Err(IdentityError::RemoveUnsupported)
        ));
        assert!(pq.cannot_remove() && !ivf.cannot_remove());
        assert_eq!(
            pq.remove(&[77, 78]).unwrap(),
            0,
            "ids it does not hold: nothing to rebuild"
        );
        assert_eq!(pq.holds(1003), Some(true));
        assert_eq!(pq.holds(77), Some(false));
        assert_eq!(ivf.holds(1003), None);
        pq.add(5, &data[20].1).unwrap();
        let hit = pq.search(&data[20].1, 1).unwrap()[0];
        assert_eq!(hit.template_id, 5);
        // Re-ranked by the exact vectors: the score is the exact cosine, not the code's.
        assert!((hit.score - 1.0).abs() < 1e-4, "{hit:?}");
    }

    #[test]
    fn persisted_index_reopens_and_is_rebuilt_when_missing_stale_or_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.faiss");
        let data = unit_vectors(50, 3);
        let source = || data.clone();
        let key = Sealer::from_key(&[7; 32]);
        let open = |expected| {
            IdentityIndex::open_or_rebuild(&path, IndexKind::Flat, expected, 0, &key, source)
                .unwrap()
        };
        let (_, rebuilt) = open(50);
        assert!(rebuilt, "missing file is rebuilt");
        let (index, rebuilt) = open(50);
        assert!(!rebuilt, "a good file is reused");
        assert_eq!(index.search(&data[4].1, 1).unwrap()[0].template_id, 1004);
        // The file holds no embedding in clear.
        let raw = std::fs::read(&path).unwrap();
        let first: Vec<u8> = data[0].1[..4]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert!(!raw.windows(first.len()).any(|w| w == first.as_slice()));
        let (_, rebuilt) = open(51);
        assert!(rebuilt, "a count that disagrees with the store is rebuilt");
        let (_, rebuilt) = IdentityIndex::open_or_rebuild(
            &path,
            IndexKind::Flat,
            51,
            0,
            &Sealer::from_key(&[8; 32]),
            source,
        )
        .unwrap();
        assert!(rebuilt, "a file sealed with another key is rebuilt");
        std::fs::write(&path, b"garbage").unwrap();
        let (index, rebuilt) = open(50);
        assert!(rebuilt && index.len() == 50, "a corrupt file is rebuilt");

        // Another structure does not open as this one; another search breadth does.
        let ivf = |nlist, nprobe| IndexKind::Ivf { nlist, nprobe };
        let reopen = |kind| {
            IdentityIndex::open_or_rebuild(&path, kind, 50, 0, &key, source)
                .unwrap()
                .1
        };
        assert!(reopen(ivf(4, 2)), "flat file, IVF configured: rebuilt");
        assert!(!reopen(ivf(4, 3)), "only nprobe changed: reused");
        assert!(reopen(ivf(8, 3)), "nlist changed: rebuilt");
        assert!(
            reopen(IndexKind::Hnsw {
                m: 8,
                ef_search: 16
            }),
            "HNSW configured: rebuilt"
        );
        let pq = |m, k_factor| IndexKind::PqRefine { m, k_factor };
        assert!(reopen(pq(16, 4)), "PQ configured: rebuilt");
        assert!(!reopen(pq(16, 8)), "only k_factor changed: reused");
        // Read back, it still knows which ids it holds.
        let (mut opened, _) =
            IdentityIndex::open_or_rebuild(&path, pq(16, 8), 50, 0, &key, source).unwrap();
        assert_eq!(opened.holds(1049), Some(true));
        assert_eq!(opened.remove(&[5]).unwrap(), 0);
        assert!(matches!(
            opened.remove(&[1049]),
            Err(IdentityError::RemoveUnsupported)
        ));
        assert!(reopen(pq(32, 8)), "m changed: rebuilt");
        // The change-log version it was saved at comes back; a file saved at a later version
        // than the store's latest (a store restored from an older state) is rebuilt.
        let built = IdentityIndex::build(IndexKind::Flat, &data).unwrap();
        built.save(&path, &key, 7).unwrap();
        let (opened, rebuilt) =
            IdentityIndex::open_or_rebuild(&path, IndexKind::Flat, 50, 9, &key, source).unwrap();
        assert!(!rebuilt);
        assert_eq!(opened.file_version(), Some(7));
        let (rebuilt_index, rebuilt) =
            IdentityIndex::open_or_rebuild(&path, IndexKind::Flat, 50, 6, &key, source).unwrap();
        assert!(rebuilt, "saved after the store's latest version: rebuilt");
        assert_eq!(rebuilt_index.file_version(), None);
        assert!(
            reopen(IndexKind::IvfSq8 {
                nlist: 4,
                nprobe: 2
            }),
            "8-bit IVF: always built"
        );
        assert!(!path.exists(), "and its file removed, never written");
    }

    #[test]
    fn many_threads_search_one_index_at_once_and_agree_with_one() {
        let data = unit_vectors(3_000, 5);
        for kind in [
            IndexKind::Flat,
            IndexKind::IvfSq8 {
                nlist: 16,
                nprobe: 4,
            },
            IndexKind::Ivf {
                nlist: 16,
                nprobe: 4,
            },
            IndexKind::Hnsw {
                m: 16,
                ef_search: 32,
            },
            IndexKind::PqRefine { m: 16, k_factor: 8 },
        ] {
            let index = IdentityIndex::build(kind, &data).unwrap();
            let alone: Vec<Vec<Hit>> = data
                .iter()
                .step_by(7)
                .map(|(_, v)| index.search(v, 3).unwrap())
                .collect();
            let together: Vec<Vec<Vec<Hit>>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            data.iter()
                                .step_by(7)
                                .map(|(_, v)| index.search(v, 3).unwrap())
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for results in together {
                assert_eq!(results, alone, "{kind:?}");
            }
            if kind == IndexKind::Flat {
                // Exact search finds every stored template first.
                assert!(alone
                    .iter()
                    .zip(data.iter().step_by(7))
                    .all(|(hits, (id, _))| hits[0].template_id == *id));
            }
        }
    }

    #[test]
    fn an_ivf_built_small_knows_when_it_has_outgrown_its_lists() {
        let data = unit_vectors(4_000, 9);
        let kind = IndexKind::Ivf {
            nlist: 64,
            nprobe: 8,
        };
        let mut index = IdentityIndex::build(kind, &data[..40]).unwrap();
        assert!(
            !index.outgrown(),
            "one list for 40 templates is what they train"
        );
        for (id, v) in &data[40..150] {
            index.add(*id, v).unwrap();
        }
        assert!(
            !index.outgrown(),
            "150 templates would train 3 lists: not yet worth it"
        );
        for (id, v) in &data[150..] {
            index.add(*id, v).unwrap();
        }
        assert!(index.outgrown(), "4,000 templates train 64 lists; it has 1");
        assert_eq!(
            index.search(&data[3_000].1, 1).unwrap()[0].template_id,
            data[3_000].0
        );
        let rebuilt = IdentityIndex::build(kind, &data).unwrap();
        assert!(!rebuilt.outgrown());
        let flat = IdentityIndex::build(IndexKind::Flat, &data).unwrap();
        assert!(!flat.outgrown(), "exact search is one list at any size");
        // A product quantiser trained on a handful is outgrown once it holds four times as
        // many.
        let pq = IndexKind::PqRefine { m: 16, k_factor: 8 };
        let mut small = IdentityIndex::build(pq, &data[..100]).unwrap();
        for (id, v) in &data[100..399] {
            small.add(*id, v).unwrap();
        }
        assert!(!small.outgrown());
        small.add(data[399].0, &data[399].1).unwrap();
        assert!(small.outgrown());
    }
}
